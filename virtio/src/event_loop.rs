//! The device back-ends' event loop: one thread (`virtio-io`) running rust-vmm's
//! `event-manager` over every virtio device's queue notification eventfds.
//!
//! It takes no VMM lock but each device's core lock while it serves that device's queue.
//! Dropping the [`EventLoop`] stops the thread and waits for it (a VM reset or exit).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSubscriber, Events, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::drain;

/// Errors starting the event loop.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The epoll instance or the stop eventfd could not be created.
    #[error("cannot create the virtio event loop: {0}")]
    Create(#[source] std::io::Error),
    /// event-manager refused to start.
    #[error("cannot create the virtio event loop: {0}")]
    Manager(#[source] event_manager::Error),
    /// The thread could not be started.
    #[error("cannot start the virtio-io thread: {0}")]
    Spawn(#[source] std::io::Error),
}

type Subscriber = Arc<dyn EventSubscriber + Send + Sync>;

/// Watches the stop eventfd.
struct Stopper {
    fd: EventFd,
    stopped: Arc<AtomicBool>,
}

impl EventSubscriber for Stopper {
    fn process(&self, _events: Events, _ops: &mut EventOps) {
        drain(&self.fd);
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("virtio-io: cannot watch the stop eventfd: {e}");
        }
    }
}

/// The running `virtio-io` thread.
pub struct EventLoop {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoop {
    /// Starts the thread serving `subscribers`.
    pub fn spawn(subscribers: Vec<Subscriber>) -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Manager)?;
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let stop = EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::Create)?;
        let stopped = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Arc::new(Stopper {
            fd: stop.try_clone().map_err(EventLoopError::Create)?,
            stopped: stopped.clone(),
        }));
        let thread = std::thread::Builder::new()
            .name(String::from("virtio-io"))
            .spawn(move || {
                while !stopped.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        log::error!("virtio-io: {e}");
                        return;
                    }
                }
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
