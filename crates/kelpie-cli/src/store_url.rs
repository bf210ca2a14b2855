//! `--store` values: `sqlite:PATH`, `etcd://HOST:PORT[,HOST:PORT...]` and `memory`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// The store used when `--store` is not given.
pub const STORE_DEFAULT: &str = "sqlite:./kelpie-leases.db";
/// The port assumed for an etcd endpoint given without one (etcd's client port).
pub const ETCD_PORT_DEFAULT: u16 = 2379;
/// Most etcd endpoints accepted in one URL; a cluster has a handful of members.
pub const ETCD_ENDPOINTS_MAX: usize = 16;

/// Where the leases live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A SQLite file on this host.
    Sqlite(PathBuf),
    /// An etcd cluster.
    Etcd(Vec<EtcdEndpoint>),
    /// A store in this process's memory, gone when it exits (benchmarks only).
    Memory,
}

/// One etcd member's client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdEndpoint {
    /// Host name or IP address (an IPv6 address keeps its brackets).
    pub host: String,
    /// Client port.
    pub port: u16,
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
    /// `etcd://` without endpoints.
    #[error("etcd:// needs at least one HOST:PORT, e.g. etcd://127.0.0.1:2379")]
    EtcdNoEndpoints,
    /// Too many endpoints.
    #[error("etcd:// lists {count} endpoints; the limit is {ETCD_ENDPOINTS_MAX}")]
    EtcdTooManyEndpoints {
        /// How many were given.
        count: usize,
    },
    /// An endpoint did not parse.
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    EtcdBadEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What was wrong.
        reason: &'static str,
    },
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
            return parse_etcd(rest).map(StoreUrl::Etcd);
        }
        if let Some(rest) = value.strip_prefix("sqlite:") {
            // `sqlite:///abs/path` and `sqlite://rel` are accepted too, as URL habits suggest.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(StoreUrlError::SqliteNoPath);
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        Err(StoreUrlError::UnknownScheme {
            given: value.to_string(),
        })
    }
}

fn parse_etcd(rest: &str) -> Result<Vec<EtcdEndpoint>, StoreUrlError> {
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err(StoreUrlError::EtcdNoEndpoints);
    }
    let endpoints = rest
        .split(',')
        .map(parse_endpoint)
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.len() > ETCD_ENDPOINTS_MAX {
        return Err(StoreUrlError::EtcdTooManyEndpoints {
            count: endpoints.len(),
        });
    }
    Ok(endpoints)
}

fn parse_endpoint(endpoint: &str) -> Result<EtcdEndpoint, StoreUrlError> {
    let bad = |reason| StoreUrlError::EtcdBadEndpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    // An IPv6 address is bracketed so that its colons are not taken for the port's.
    let (host, port) = if endpoint.starts_with('[') {
        let close = endpoint.find(']').ok_or_else(|| bad("unclosed '['"))?;
        let (host, after) = endpoint.split_at(close + 1);
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(bad("expected ':' after ']'")),
            },
        }
    } else {
        match endpoint.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (endpoint, None),
        }
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '[' | ']'));
    if !host_ok {
        return Err(bad("the host must be a name or an IP address"));
    }
    let port = match port {
        None => ETCD_PORT_DEFAULT,
        Some(port) => match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(bad("the port must be a number in 1..=65535")),
            Ok(port) => port,
        },
    };
    Ok(EtcdEndpoint {
        host: host.to_string(),
        port,
    })
}

impl fmt::Display for EtcdEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            StoreUrl::Memory => f.write_str("memory"),
            StoreUrl::Etcd(endpoints) => {
                f.write_str("etcd://")?;
                for (index, endpoint) in endpoints.iter().enumerate() {
                    if index > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{endpoint}")?;
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
    }

    #[test]
    fn etcd_lists_endpoints_with_default_port() {
        let url = parse("etcd://10.0.0.1:2379,etcd-b,[::1]:32379/").unwrap();
        let StoreUrl::Etcd(endpoints) = &url else {
            panic!("{url:?}");
        };
        let shown: Vec<String> = endpoints.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["10.0.0.1:2379", "etcd-b:2379", "[::1]:32379"]);
        assert_eq!(
            url.to_string(),
            "etcd://10.0.0.1:2379,etcd-b:2379,[::1]:32379"
        );
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
        assert_eq!(parse("etcd://"), Err(StoreUrlError::EtcdNoEndpoints));
        for bad in [
            "etcd://h:0",
            "etcd://h:99999",
            "etcd://h:x",
            "etcd://:1",
            "etcd://a,,b",
            "etcd://[::1",
            "etcd://h a:1",
        ] {
            assert!(
                matches!(parse(bad), Err(StoreUrlError::EtcdBadEndpoint { .. })),
                "{bad}"
            );
        }
        let many = vec!["h:1"; ETCD_ENDPOINTS_MAX + 1].join(",");
        assert!(matches!(
            parse(&format!("etcd://{many}")),
            Err(StoreUrlError::EtcdTooManyEndpoints { .. })
        ));
        assert_eq!(parse("memory").unwrap(), StoreUrl::Memory);
    }
}
