//! `-object` / `--object` values: QEMU's `TYPE,key=value,…` form (`,,` a literal comma, so a
//! distinguished name is written `identity=C=GB,,CN=src`) or its JSON form
//! (`{"qom-type": …, "id": …, …}`), made into the migration's TLS objects: `tls-creds-x509`
//! and the authorization objects `authz-simple`, `authz-list` (rules as dotted keys
//! `rules.0.match=…` or in JSON) and `authz-list-file`. The one place a command line's object
//! is parsed; `hopvm run` and the QEMU front end both come here.

use migration::transport::tls::{TlsError, TlsObject};

/// Why an `-object` cannot be created.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// Its JSON form does not parse, or is not an object.
    #[error("invalid JSON object: {0}")]
    Json(String),
    /// The object itself (a missing property, unreadable credentials…).
    #[error(transparent)]
    Object(#[from] TlsError),
}

/// Its `qom-type` (the implied first item, or `qom-type=`), without creating it.
pub fn object_type(spec: &str) -> Option<String> {
    if spec.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(spec).ok()?;
        return v.get("qom-type")?.as_str().map(str::to_owned);
    }
    let first = crate::qemu_opts::split_options(spec).into_iter().next()?;
    match first.split_once('=') {
        Some(("qom-type", ty)) => Some(ty.to_owned()),
        Some(_) => None,
        None => Some(first),
    }
}

/// Creates the object `spec` describes (its files read now, as QEMU does).
pub fn parse_object(spec: &str) -> Result<TlsObject, ObjectError> {
    if spec.trim_start().starts_with('{') {
        let v: serde_json::Value =
            serde_json::from_str(spec).map_err(|e| ObjectError::Json(e.to_string()))?;
        let serde_json::Value::Object(map) = v else {
            return Err(ObjectError::Json(String::from("not an object")));
        };
        if map.get("qom-type").and_then(|t| t.as_str()) == Some("tls-creds-x509") {
            // Its properties are strings and booleans: as the key=value form.
            let mut items = Vec::new();
            for (k, v) in &map {
                let text = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Bool(b) => String::from(if *b { "on" } else { "off" }),
                    other => {
                        return Err(ObjectError::Json(format!(
                            "'{k}': unsupported value {other}"
                        )))
                    }
                };
                items.push((k.clone(), text));
            }
            return Ok(TlsObject::from_keyval(
                items.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            )?);
        }
        return Ok(TlsObject::authz_from_json(&map)?);
    }
    let mut items = Vec::new();
    for (i, part) in crate::qemu_opts::split_options(spec)
        .into_iter()
        .enumerate()
    {
        match part.split_once('=') {
            Some((k, v)) => items.push((k.to_owned(), v.to_owned())),
            None if i == 0 => items.push((String::from("qom-type"), part)),
            None => {
                return Err(ObjectError::Object(TlsError::Authz(
                    migration::transport::tls::authz::AuthzError::NotKeyValue(part),
                )))
            }
        }
    }
    Ok(TlsObject::from_keyval(
        items.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authz_objects_from_both_forms() {
        let o = parse_object("authz-simple,id=a,identity=C=GB,,O=Org,,CN=src").unwrap();
        let TlsObject::Authz(a) = &o else {
            panic!("not authz")
        };
        assert_eq!(a.id(), "a");
        assert!(a.is_allowed("C=GB,O=Org,CN=src").unwrap());
        let o = parse_object(
            "qom-type=authz-list,id=l,policy=deny,rules.0.match=C=GB,,*,rules.0.policy=allow,\
             rules.0.format=glob",
        )
        .unwrap();
        let TlsObject::Authz(l) = &o else {
            panic!("not authz")
        };
        assert!(l.is_allowed("C=GB,CN=x").unwrap());
        assert!(!l.is_allowed("C=FR,CN=x").unwrap());
        let o = parse_object(
            r#"{"qom-type": "authz-list", "id": "j", "policy": "allow",
                "rules": [{"match": "CN=bad", "policy": "deny"}]}"#,
        )
        .unwrap();
        let TlsObject::Authz(j) = &o else {
            panic!("not authz")
        };
        assert!(!j.is_allowed("CN=bad").unwrap() && j.is_allowed("CN=good").unwrap());
        assert_eq!(
            object_type("authz-list,id=x").as_deref(),
            Some("authz-list")
        );
        assert_eq!(
            object_type("qom-type=authz-simple,id=x").as_deref(),
            Some("authz-simple")
        );
        assert_eq!(
            object_type(r#"{"qom-type": "authz-pam"}"#).as_deref(),
            Some("authz-pam")
        );
    }

    #[test]
    fn bad_objects_are_errors() {
        for (spec, want) in [
            ("authz-pam,id=p,service=x", "authz-pam is not supported"),
            ("authz-simple,id=a", "Parameter 'identity' is missing"),
            ("authz-simple,id=a,identity", "'identity' is not KEY=VALUE"),
            ("colour-object,id=a", "invalid object type: colour-object"),
            ("{\"qom-type\": \"authz-list\"", "invalid JSON object"),
            ("[1]", "invalid object type"),
            (
                "authz-list,id=l,rules.0.match=x,rules.0.policy=allow,rules.5.match=y,\
                 rules.5.policy=deny",
                "Parameter 'rules.1' is missing",
            ),
            (
                "authz-list-file,id=f,filename=/nonexistent/acl",
                "Unable to read '/nonexistent/acl'",
            ),
        ] {
            let err = parse_object(spec).unwrap_err().to_string();
            assert!(err.contains(want), "{spec}: {err}");
        }
    }
}
