//! A certificate's subject as the identity `tls-authz` checks: the distinguished name as QEMU
//! gets it from GnuTLS (`gnutls_x509_crt_get_dn`, GnuTLS 3.7 as QEMU 7.2 is built with).
//!
//! That string keeps the certificate's own order of relative distinguished names (for
//! `openssl req -subj "/C=GB/O=Example Org/CN=laptop"`: `C=GB,O=Example Org,CN=laptop`; not
//! reversed as RFC 4514 and `certtool -i` write it), joins the attributes of a multi-valued
//! one with `+` in their encoded order, names the attributes GnuTLS knows (`CN`, `O`, `OU`,
//! `L`, `ST`, `C`, `DC`, `UID`, `EMAIL`, `serialNumber`, …) and writes any other as its dotted
//! OID with `#` and the hex of its DER value. In values, `, + " \ < > ;`, a leading `#` or
//! space and a trailing space are escaped with `\`. Checked against GnuTLS 3.7.9 and QEMU
//! 7.2's own denial message in this module's tests.

use x509_parser::der_parser::asn1_rs::{Any, Tag, ToDer};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a certificate's distinguished name cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum DnError {
    /// The certificate does not parse.
    #[error("the certificate does not parse: {0}")]
    Certificate(String),
    /// The subject is empty (GnuTLS's wording).
    #[error("The requested data were not available.")]
    Empty,
}

/// How GnuTLS decodes a known attribute's value.
#[derive(Clone, Copy)]
enum Kind {
    /// X.520 DirectoryString: teletex, printable, universal, UTF-8 or BMP.
    Directory,
    /// One string type only.
    Only(Tag),
}

/// The attributes GnuTLS names (its `_oid2str` table), with how it reads their values.
const KNOWN: &[(&str, &str, Kind)] = &[
    ("1.3.6.1.5.5.7.9.2", "placeOfBirth", Kind::Directory),
    (
        "1.3.6.1.5.5.7.9.3",
        "gender",
        Kind::Only(Tag::PrintableString),
    ),
    (
        "1.3.6.1.5.5.7.9.4",
        "countryOfCitizenship",
        Kind::Only(Tag::PrintableString),
    ),
    (
        "1.3.6.1.5.5.7.9.5",
        "countryOfResidence",
        Kind::Only(Tag::PrintableString),
    ),
    ("2.5.4.6", "C", Kind::Only(Tag::PrintableString)),
    ("2.5.4.9", "street", Kind::Directory),
    ("2.5.4.12", "title", Kind::Directory),
    ("2.5.4.10", "O", Kind::Directory),
    ("2.5.4.11", "OU", Kind::Directory),
    ("2.5.4.3", "CN", Kind::Directory),
    ("2.5.4.7", "L", Kind::Directory),
    ("2.5.4.8", "ST", Kind::Directory),
    ("2.5.4.13", "description", Kind::Directory),
    ("2.5.4.5", "serialNumber", Kind::Only(Tag::PrintableString)),
    (
        "2.5.4.20",
        "telephoneNumber",
        Kind::Only(Tag::PrintableString),
    ),
    ("2.5.4.4", "surName", Kind::Directory),
    ("2.5.4.43", "initials", Kind::Directory),
    ("2.5.4.44", "generationQualifier", Kind::Directory),
    ("2.5.4.42", "givenName", Kind::Directory),
    ("2.5.4.65", "pseudonym", Kind::Directory),
    ("2.5.4.46", "dnQualifier", Kind::Only(Tag::PrintableString)),
    ("2.5.4.17", "postalCode", Kind::Directory),
    ("2.5.4.41", "name", Kind::Directory),
    ("2.5.4.15", "businessCategory", Kind::Directory),
    (
        "0.9.2342.19200300.100.1.25",
        "DC",
        Kind::Only(Tag::Ia5String),
    ),
    ("0.9.2342.19200300.100.1.1", "UID", Kind::Directory),
    (
        "1.2.840.113556.1.4.656",
        "userPrincipalName",
        Kind::Directory,
    ),
    (
        "1.3.6.1.4.1.311.60.2.1.1",
        "jurisdictionOfIncorporationLocalityName",
        Kind::Directory,
    ),
    (
        "1.3.6.1.4.1.311.60.2.1.2",
        "jurisdictionOfIncorporationStateOrProvinceName",
        Kind::Directory,
    ),
    (
        "1.3.6.1.4.1.311.60.2.1.3",
        "jurisdictionOfIncorporationCountryName",
        Kind::Only(Tag::PrintableString),
    ),
    ("1.2.840.113549.1.9.1", "EMAIL", Kind::Only(Tag::Ia5String)),
    ("1.3.6.1.5.5.7.8.5", "XmppAddr", Kind::Only(Tag::Utf8String)),
];

/// The subject of a DER certificate as GnuTLS's `gnutls_x509_crt_get_dn` writes it.
pub fn distinguished_name(cert_der: &[u8]) -> Result<String, DnError> {
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| DnError::Certificate(e.to_string()))?;
    let mut out = String::new();
    if cert.subject().iter_rdn().next().is_none() {
        return Err(DnError::Empty);
    }
    for (i, rdn) in cert.subject().iter_rdn().enumerate() {
        for (j, ava) in rdn.iter().enumerate() {
            if i > 0 || j > 0 {
                out.push(if j > 0 { '+' } else { ',' });
            }
            let oid = ava.attr_type().to_id_string();
            let value = ava.attr_value();
            match KNOWN.iter().find(|(o, _, _)| *o == oid) {
                None => {
                    out.push_str(&oid);
                    out.push('=');
                    out.push_str(&hex_of_der(value));
                }
                Some((_, name, kind)) => {
                    out.push_str(name);
                    out.push('=');
                    // A value GnuTLS cannot read as its string type (a wrong type, a NUL
                    // inside) is written as the hex of its DER, as for an unknown OID.
                    match decode(value, *kind).filter(|t| !t.contains('\0')) {
                        Some(text) => escape_into(&text, &mut out),
                        None => out.push_str(&hex_of_der(value)),
                    }
                }
            }
        }
    }
    Ok(out)
}

/// A known attribute's value as text (GnuTLS: hex for what it does not convert).
fn decode(value: &Any<'_>, kind: Kind) -> Option<String> {
    let data = value.data;
    let tag = value.tag();
    let utf8 = || String::from_utf8(data.to_vec()).ok();
    match kind {
        Kind::Only(want) => (tag == want).then(utf8).flatten(),
        Kind::Directory => match tag {
            Tag::PrintableString | Tag::Utf8String => utf8(),
            // ASCII-only teletex is taken as it is; anything else is shown in hex.
            Tag::TeletexString if data.is_ascii() => utf8(),
            Tag::TeletexString | Tag::UniversalString => Some(hex_of(data)),
            Tag::BmpString => Some(ucs2_to_utf8(data).unwrap_or_else(|| hex_of(data))),
            _ => None,
        },
    }
}

/// UCS-2 (big-endian) to UTF-8; `None` for an odd length or a surrogate.
fn ucs2_to_utf8(data: &[u8]) -> Option<String> {
    if data.len() % 2 != 0 {
        return None;
    }
    data.chunks_exact(2)
        .map(|c| char::from_u32(u32::from(u16::from_be_bytes([c[0], c[1]]))))
        .collect()
}

/// `#` and the lowercase hex of `data`.
fn hex_of(data: &[u8]) -> String {
    let mut s = String::with_capacity(1 + 2 * data.len());
    s.push('#');
    for b in data {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// `#` and the hex of a value's whole DER encoding (tag and length included).
fn hex_of_der(value: &Any<'_>) -> String {
    match value.to_der_vec() {
        Ok(der) => hex_of(&der),
        Err(_) => hex_of(value.data),
    }
}

/// Appends `text` with GnuTLS's escapes.
fn escape_into(text: &str, out: &mut String) {
    let last = text.len().saturating_sub(1);
    for (i, c) in text.char_indices() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, DnValue, KeyPair};

    /// A self-signed certificate with `subject`, in DER.
    fn cert(subject: &[(DnType, DnValue)]) -> Vec<u8> {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in subject {
            p.distinguished_name.push(t.clone(), v.clone());
        }
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn utf8(s: &str) -> DnValue {
        DnValue::Utf8String(s.into())
    }

    fn printable(s: &str) -> DnValue {
        DnValue::PrintableString(s.try_into().unwrap())
    }

    /// QEMU 7.2 printed, for a client certificate made with `openssl req -subj
    /// "/C=GB/ST=London/L=London/O=Example, Org/OU=a+CN=b\"q/CN=laptop.example.com"`:
    /// `TLS x509 authz check for C=GB,ST=London,L=London,O=Example\, Org,OU=a+CN=b\"q,
    /// CN=laptop.example.com is denied`. That certificate (PEM body):
    const QEMU_SEEN: &str = "MIIB8TCCAZegAwIBAgIUGd6B4RHChap+aw06hjM4G4GIfoMwCgYIKoZIzj0EAwIw\
        DTELMAkGA1UEAwwCY2EwHhcNMjYxMjA3MTgxNzM1WhcNMjcwMTA2MTgxNzM1WjB7\
        MQswCQYDVQQGEwJHQjEPMA0GA1UECAwGTG9uZG9uMQ8wDQYDVQQHDAZMb25kb24x\
        FTATBgNVBAoMDEV4YW1wbGUsIE9yZzEWMAgGA1UECwwBYTAKBgNVBAMMA2IicTEb\
        MBkGA1UEAwwSbGFwdG9wLmV4YW1wbGUuY29tMFkwEwYHKoZIzj0CAQYIKoZIzj0D\
        AQcDQgAEIF4DzTlEHATDkHbMM3lWPZiuptyK+XjPhFGf0KkWdvT+XwqYEdhTFUUK\
        lxyTSoUTEC8euNfixm1yrqasmmlpx6NnMGUwDgYDVR0PAQH/BAQDAgeAMBMGA1Ud\
        JQQMMAoGCCsGAQUFBwMCMB0GA1UdDgQWBBQvrDuLhcfn6+PI5fZH6M9Kdt4crjAf\
        BgNVHSMEGDAWgBRXgoFIEcA9jJ3lmq/xo8m4T2EzWjAKBggqhkjOPQQDAgNIADBF\
        AiEA/SgVwsakC67hJDhvgLmZ0JbQFZWrhw9KWNLjTvWS++wCIF2udqTpFzSXQMcf\
        MMe8K5cHUGlvaTUyL9M59+BB63TA";

    /// Each case: a subject (one attribute per type: rcgen keeps one) and what GnuTLS
    /// 3.7.9's `gnutls_x509_crt_get_dn` returned for that very certificate.
    #[test]
    fn subjects_as_gnutls_writes_them() {
        let ia5 = |s: &str| DnValue::Ia5String(s.try_into().unwrap());
        let oid = |o: &[u64]| DnType::CustomDnType(o.to_vec());
        let cases: Vec<(Vec<(DnType, DnValue)>, &str)> = vec![
            (
                vec![
                    (DnType::CountryName, printable("GB")),
                    (DnType::StateOrProvinceName, utf8("London")),
                    (DnType::LocalityName, utf8("London")),
                    (DnType::OrganizationName, utf8("Example Org")),
                    (DnType::CommonName, utf8("laptop.example.com")),
                ],
                "C=GB,ST=London,L=London,O=Example Org,CN=laptop.example.com",
            ),
            (
                vec![
                    (
                        DnType::OrganizationName,
                        utf8("Example, Inc. <a+b> \"q\";x\\y=z"),
                    ),
                    (DnType::CommonName, utf8("café Zürich")),
                    (DnType::OrganizationalUnitName, utf8("#hash # mid")),
                ],
                "O=Example\\, Inc. \\<a\\+b\\> \\\"q\\\"\\;x\\\\y=z,CN=café Zürich,\
                 OU=\\#hash # mid",
            ),
            (
                vec![
                    (DnType::CommonName, utf8(" leading and trailing ")),
                    (DnType::OrganizationName, utf8(" ")),
                    (
                        DnType::OrganizationalUnitName,
                        DnValue::BmpString("bmp é".try_into().unwrap()),
                    ),
                ],
                "CN=\\ leading and trailing\\ ,O=\\ ,OU=bmp é",
            ),
            (
                vec![
                    (oid(&[0, 9, 2342, 19200300, 100, 1, 25]), ia5("example")),
                    (oid(&[1, 2, 840, 113549, 1, 9, 1]), ia5("j@example.com")),
                    (oid(&[2, 5, 4, 5]), printable("1234")),
                    (oid(&[1, 2, 3, 4]), utf8("xyz")),
                    (
                        DnType::CommonName,
                        DnValue::TeletexString("teletex".try_into().unwrap()),
                    ),
                    (
                        DnType::OrganizationName,
                        DnValue::UniversalString("u".try_into().unwrap()),
                    ),
                ],
                "DC=example,EMAIL=j@example.com,serialNumber=1234,1.2.3.4=#0c0378797a,\
                 CN=teletex,O=\\#00000075",
            ),
            // Values GnuTLS does not read as their attribute's string type: DER in hex.
            (vec![(DnType::CountryName, utf8("GB"))], "C=#0c024742"),
            (vec![(DnType::CommonName, ia5("ia5"))], "CN=#1603696135"),
            (
                vec![(DnType::CommonName, utf8("nul\0inside"))],
                "CN=#0c0a6e756c00696e73696465",
            ),
        ];
        for (subject, want) in cases {
            assert_eq!(distinguished_name(&cert(&subject)).unwrap(), want);
        }
    }

    #[test]
    fn no_subject_no_identity() {
        // GnuTLS: "The requested data were not available." (QEMU then refuses the client.)
        assert!(matches!(
            distinguished_name(&cert(&[])),
            Err(DnError::Empty)
        ));
        assert!(matches!(
            distinguished_name(b"not a certificate"),
            Err(DnError::Certificate(_))
        ));
    }

    #[test]
    fn the_certificate_qemu_printed() {
        use rustls::pki_types::pem::PemObject;
        let pem = format!("-----BEGIN CERTIFICATE-----\n{QEMU_SEEN}\n-----END CERTIFICATE-----\n");
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(
            distinguished_name(&der).unwrap(),
            "C=GB,ST=London,L=London,O=Example\\, Org,OU=a+CN=b\\\"q,CN=laptop.example.com"
        );
    }
}
