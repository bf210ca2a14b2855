//! `--store` values: `sqlite:PATH`, `etcd://HOST:PORT[,HOST:PORT...][?ca=PATH[&cert=PATH&key=PATH]]`
//! and `memory`.
//!
//! etcd endpoints are parsed by the etcd backend's own parser (`kelpie_lease::backend::parse_endpoints`),
//! so the CLI and the library accept the same lists. A `kelpie` built without the `etcd`
//! feature refuses `etcd://` with the command that builds it in.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The store used when `--store` is not given.
pub const STORE_DEFAULT: &str = "sqlite:./kelpie-leases.db";

/// The build command that adds the etcd backend to `kelpie`.
pub const ETCD_BUILD_COMMAND: &str = "cargo build --release -p kelpie-cli --features etcd";

/// Where the leases live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A SQLite file on this host.
    Sqlite(PathBuf),
    /// An etcd cluster: its client endpoints as `HOST:PORT`, checked by the etcd backend,
    /// and its TLS files.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Etcd(EtcdUrl),
    /// A store in this process's memory, gone when it exits (benchmarks only).
    Memory,
}

/// `etcd://HOST:PORT[,HOST:PORT...][?ca=PATH[&cert=PATH&key=PATH]]`: the endpoints, the CA
/// that signs the servers' certificates (TLS on) and this client's certificate and key (for a
/// cluster that requires client certificates).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// The client endpoints.
    pub endpoints: Vec<String>,
    /// `ca=`: PEM file of the CA that signs the servers' certificates; turns TLS on.
    pub ca: Option<PathBuf>,
    /// `cert=` and `key=`: this client's certificate and private key, PEM files.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// Why a `--store` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreUrlError {
    /// The value was empty.
    #[error("the store is empty; use sqlite:PATH, etcd://HOST:PORT[,HOST:PORT] or memory")]
    Empty,
    /// The scheme is not one of ours.
    #[error("unknown store {given:?}; use sqlite:PATH, etcd://HOST:PORT[,HOST:PORT] or memory")]
    UnknownScheme {
        /// The refused value.
        given: String,
    },
    /// `sqlite:` without a path.
    #[error("sqlite: needs a file path, e.g. sqlite:./kelpie-leases.db")]
    SqliteNoPath,
    /// A `sqlite:` path that starts or ends with white space.
    #[error("sqlite:{path:?}: the path starts or ends with white space; remove it")]
    SqlitePathSpaces {
        /// The path as given.
        path: String,
    },
    /// The etcd endpoint list did not parse.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    #[error("{given:?}: {reason}")]
    EtcdEndpoints {
        /// The value as given.
        given: String,
        /// What was wrong, from the etcd backend's parser.
        reason: String,
    },
    /// The etcd URL's `?...` part was malformed.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    #[error("{given:?}: {reason}; the etcd options are ?ca=PATH, and with it cert=PATH&key=PATH")]
    EtcdQuery {
        /// The value as given.
        given: String,
        /// What was wrong.
        reason: String,
    },
    /// This binary was built without the etcd backend.
    #[cfg_attr(feature = "etcd", allow(dead_code))]
    #[error(
        "this kelpie was built without the etcd backend; build it with `{ETCD_BUILD_COMMAND}` \
         (its build needs protoc: apt-get install protobuf-compiler libprotobuf-dev)"
    )]
    EtcdNotBuilt,
}

impl FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        if value.is_empty() {
            return Err(StoreUrlError::Empty);
        }
        if value == "memory" || value == "memory:" {
            return Ok(StoreUrl::Memory);
        }
        if let Some(rest) = value.strip_prefix("etcd://") {
            return parse_etcd(value, rest);
        }
        if let Some(rest) = value.strip_prefix("sqlite:") {
            // `sqlite:///abs/path` and `sqlite://rel` are accepted too, as URL habits suggest.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(StoreUrlError::SqliteNoPath);
            }
            // A space at either end (the value was trimmed, so after the scheme) is almost
            // always a quoting slip, and would name a file no one means ("sqlite: leases.db").
            if path.trim() != path {
                return Err(StoreUrlError::SqlitePathSpaces {
                    path: path.to_string(),
                });
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        Err(StoreUrlError::UnknownScheme {
            given: value.to_string(),
        })
    }
}

#[cfg(feature = "etcd")]
fn parse_etcd(given: &str, rest: &str) -> Result<StoreUrl, StoreUrlError> {
    let (list, query) = rest.split_once('?').unwrap_or((rest, ""));
    let endpoints = match kelpie_lease::backend::parse_endpoints(list) {
        Ok(endpoints) => endpoints,
        Err(error) => {
            return Err(StoreUrlError::EtcdEndpoints {
                given: given.to_string(),
                reason: error.to_string(),
            })
        }
    };
    let bad = |reason: String| StoreUrlError::EtcdQuery {
        given: given.to_string(),
        reason,
    };
    let (mut ca, mut cert, mut key) = (None, None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| bad(format!("{pair:?} is not name=value")))?;
        if value.is_empty() {
            return Err(bad(format!("{name}= needs a path")));
        }
        let slot = match name {
            "ca" => &mut ca,
            "cert" => &mut cert,
            "key" => &mut key,
            other => return Err(bad(format!("unknown option {other:?}"))),
        };
        if slot.replace(PathBuf::from(value)).is_some() {
            return Err(bad(format!("{name}= is given twice")));
        }
    }
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => return Err(bad("cert= and key= go together".into())),
    };
    if identity.is_some() && ca.is_none() {
        return Err(bad("a client certificate needs TLS: add ca=PATH".into()));
    }
    Ok(StoreUrl::Etcd(EtcdUrl {
        endpoints,
        ca,
        identity,
    }))
}

#[cfg(not(feature = "etcd"))]
fn parse_etcd(_given: &str, _rest: &str) -> Result<StoreUrl, StoreUrlError> {
    Err(StoreUrlError::EtcdNotBuilt)
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Etcd(url) => {
                write!(f, "etcd://{}", url.endpoints.join(","))?;
                let mut query = Vec::new();
                if let Some(ca) = &url.ca {
                    query.push(format!("ca={}", ca.display()));
                }
                if let Some((cert, key)) = &url.identity {
                    query.push(format!("cert={}&key={}", cert.display(), key.display()));
                }
                if !query.is_empty() {
                    write!(f, "?{}", query.join("&"))?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Result<StoreUrl, StoreUrlError> {
        value.parse()
    }

    #[test]
    fn sqlite_paths_parse_with_or_without_slashes() {
        assert_eq!(
            parse("sqlite:./kelpie-leases.db").unwrap(),
            StoreUrl::Sqlite(PathBuf::from("./kelpie-leases.db"))
        );
        assert_eq!(
            parse("sqlite:///tmp/x.db").unwrap(),
            StoreUrl::Sqlite(PathBuf::from("/tmp/x.db"))
        );
        assert_eq!(parse(STORE_DEFAULT).unwrap().to_string(), STORE_DEFAULT);
        assert_eq!(parse("sqlite:"), Err(StoreUrlError::SqliteNoPath));
        // The whole value is trimmed first; a space after the scheme is in the path.
        for spaced in ["sqlite: t.db", "sqlite:// t.db", "sqlite:\tt.db"] {
            assert!(
                matches!(parse(spaced), Err(StoreUrlError::SqlitePathSpaces { .. })),
                "{spaced:?}"
            );
        }
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_lists_endpoints_with_default_port() {
        let url = parse("etcd://10.0.0.1:2379,etcd-b,[::1]:32379/").unwrap();
        assert_eq!(
            url.to_string(),
            "etcd://10.0.0.1:2379,etcd-b:2379,[::1]:32379"
        );
        for bad in ["etcd://", "etcd://h:0", "etcd://a,,b", "etcd://h a:1"] {
            assert!(
                matches!(parse(bad), Err(StoreUrlError::EtcdEndpoints { .. })),
                "{bad}"
            );
        }
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_tls_files_come_in_the_query() {
        let url = parse("etcd://h:1?ca=/c.pem&cert=/me.pem&key=/me.key").unwrap();
        let StoreUrl::Etcd(etcd) = &url else {
            panic!("{url:?}")
        };
        assert_eq!(etcd.ca, Some(PathBuf::from("/c.pem")));
        assert_eq!(
            etcd.identity,
            Some((PathBuf::from("/me.pem"), PathBuf::from("/me.key")))
        );
        assert_eq!(
            url.to_string(),
            "etcd://h:1?ca=/c.pem&cert=/me.pem&key=/me.key"
        );
        assert_eq!(
            parse("etcd://h:1?ca=/c.pem").unwrap().to_string(),
            "etcd://h:1?ca=/c.pem"
        );
        for bad in [
            "etcd://h:1?cert=/me.pem&key=/me.key",
            "etcd://h:1?ca=/c.pem&cert=/me.pem",
            "etcd://h:1?ca=",
            "etcd://h:1?ca=/a&ca=/b",
            "etcd://h:1?tls",
            "etcd://h:1?password=x",
        ] {
            assert!(
                matches!(parse(bad), Err(StoreUrlError::EtcdQuery { .. })),
                "{bad}: {:?}",
                parse(bad)
            );
        }
    }

    #[cfg(not(feature = "etcd"))]
    #[test]
    fn etcd_without_the_feature_names_the_build_command() {
        let refused = parse("etcd://127.0.0.1:2379").unwrap_err();
        assert_eq!(refused, StoreUrlError::EtcdNotBuilt);
        assert!(refused.to_string().contains(ETCD_BUILD_COMMAND));
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        assert_eq!(parse(""), Err(StoreUrlError::Empty));
        assert!(matches!(
            parse("bogus:x"),
            Err(StoreUrlError::UnknownScheme { .. })
        ));
        assert!(parse("bogus:x")
            .unwrap_err()
            .to_string()
            .contains("sqlite:PATH"));
        assert_eq!(parse("memory").unwrap(), StoreUrl::Memory);
    }
}
