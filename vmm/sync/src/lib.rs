//! The one place hopvm decides what a poisoned lock means: nothing. Every crate of hopvm locks
//! through [`lock`] (or takes a mutex apart with [`into_inner`]) and waits through [`wait`] /
//! [`wait_timeout`].
//!
//! A mutex is poisoned when a thread panicked while holding it. hopvm's locked data stays
//! consistent across a panic — a device's registers, a queue, a run state are each updated
//! by plain assignments — and a panicking thread already reports itself; refusing every later
//! lock would turn one bug into a hung VM (or a second panic in a vCPU or the migration
//! thread). So the guard is taken as it is. The lock order is in `docs/architecture.md`.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, WaitTimeoutResult};
use std::time::Duration;

/// Locks `m`, ignoring poisoning.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The value in `m`, ignoring poisoning.
pub fn into_inner<T>(m: Mutex<T>) -> T {
    m.into_inner().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv`, releasing `guard` meanwhile, ignoring poisoning.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv` for at most `timeout`, releasing `guard` meanwhile, ignoring poisoning.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    cv.wait_timeout(guard, timeout)
        .unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_still_taken() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
        let cv = Condvar::new();
        let (g, r) = wait_timeout(&cv, lock(&m), Duration::from_millis(1));
        assert!(r.timed_out());
        assert_eq!(*g, 2);
        drop(g);
        let m = std::sync::Arc::into_inner(m).unwrap();
        assert_eq!(into_inner(m), 2);
    }
}
