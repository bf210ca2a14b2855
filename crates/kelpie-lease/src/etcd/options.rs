//! How to reach etcd: endpoints, timeouts, credentials, TLS, key prefix, lease duration.
//!
//! Every option is checked by [`EtcdOptions::validate`] before anything is contacted, and a bad
//! one is a [`StoreError::InvalidOption`] naming it, never a panic.

use std::fmt;
use std::path::PathBuf;
#[cfg(feature = "etcd")]
use std::time::Duration;

#[cfg(feature = "etcd")]
use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use kelpie_core::SharedClock;

use crate::error::StoreError;
use crate::lease::LeaseConfig;

/// The environment variable [`EtcdOptions::from_env`] reads: comma-separated endpoints.
pub const ETCD_ENDPOINTS_ENV: &str = "KELPIE_ETCD_ENDPOINTS";

/// Key prefix used when none is configured. Every lease key is this prefix followed by the
/// actor id, and nothing else is stored under it. Two deployments sharing a cluster need
/// prefixes that do not nest (neither may start with the other): under `/demo/` the keys of
/// `/demo/tenant-b/` look like leases of actors named `tenant-b/...`.
pub const ETCD_KEY_PREFIX_DEFAULT: &str = "/kelpie/leases/";

/// Longest key prefix accepted. etcd keys are limited in size by its request size limit, and
/// the actor id is appended to the prefix.
pub const ETCD_KEY_PREFIX_BYTES_MAX: usize = 512;

/// Most endpoints accepted. A real cluster has 3, 5 or 7 members; a longer list is a mistake.
pub const ETCD_ENDPOINTS_MAX: usize = 64;

/// How long `EtcdLeaseManager::connect` (feature `etcd`) waits for etcd to
/// answer, by default.
pub const ETCD_CONNECT_TIMEOUT_MS_DEFAULT: u64 = 3_000;

/// How long one request to etcd may take before it fails, by default. An etcd leader election
/// takes about one election timeout (1 s by default), so this leaves room for one.
pub const ETCD_REQUEST_TIMEOUT_MS_DEFAULT: u64 = 5_000;

/// Smallest connect or request timeout accepted: below this, loopback round trips under load
/// already fail.
pub const ETCD_TIMEOUT_MS_MIN: u64 = 10;

/// Largest connect or request timeout accepted (ten minutes): a longer wait is a hung cluster.
pub const ETCD_TIMEOUT_MS_MAX: u64 = 600_000;

const _: () = assert!(ETCD_TIMEOUT_MS_MIN <= ETCD_CONNECT_TIMEOUT_MS_DEFAULT);
const _: () = assert!(ETCD_CONNECT_TIMEOUT_MS_DEFAULT <= ETCD_TIMEOUT_MS_MAX);
const _: () = assert!(ETCD_REQUEST_TIMEOUT_MS_DEFAULT <= ETCD_TIMEOUT_MS_MAX);

/// A user name and password for etcd's authentication. `Debug` does not print the password.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdCredentials {
    /// The etcd user.
    pub username: String,
    /// Its password.
    pub password: String,
}

impl fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Settings for `EtcdLeaseManager::connect` (feature `etcd`). Build with
/// [`EtcdOptions::new`] or [`EtcdOptions::from_env`] and the `with_*` methods; more settings
/// may be added.
#[derive(Clone)]
#[non_exhaustive]
pub struct EtcdOptions {
    /// The cluster's client URLs: `http://host:port`, `https://host:port` or `host:port` (which
    /// means `https` when a CA file is set, `http` otherwise). Requests go to one member at a
    /// time; one that cannot be connected to is passed over for the next within the same
    /// request, and one that stops answering is left for the next (see `EtcdClient`).
    pub endpoints: Vec<String>,
    /// Prefix of every lease key; see [`ETCD_KEY_PREFIX_DEFAULT`]. Must not nest with another
    /// deployment's prefix on the same cluster: neither may start with the other.
    pub key_prefix: String,
    /// How long connecting (and the first request, which checks that etcd answers) may take.
    pub connect_timeout_ms: u64,
    /// How long any later request may take.
    pub request_timeout_ms: u64,
    /// etcd user and password, if the cluster has authentication enabled.
    pub credentials: Option<EtcdCredentials>,
    /// PEM file with the CA certificate(s) that sign the etcd servers' certificates. Setting it
    /// turns on TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// The server name to check the servers' certificates against, if not the endpoint's host.
    pub tls_domain_name: Option<String>,
    /// PEM files with this client's certificate and its private key, for a cluster that
    /// requires client certificates (`--client-cert-auth`). Needs TLS on (`tls_ca_file`).
    pub tls_client_identity: Option<(PathBuf, PathBuf)>,
    /// The lease duration. etcd counts lease TTLs in whole seconds, so it is rounded up to a
    /// whole second, and etcd raises it to its own minimum if it is shorter (see
    /// [`EtcdLeaseManager::lease_ttl_ms`](super::EtcdLeaseManager::lease_ttl_ms)).
    pub lease: LeaseConfig,
    /// The clock the `Lease` times are read on; `None` means a tokio clock started when the
    /// manager connects. Expiry itself is decided by etcd, never by this clock.
    pub clock: Option<SharedClock>,
}

impl EtcdOptions {
    /// Options for the given endpoints, with every other setting at its default.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            key_prefix: ETCD_KEY_PREFIX_DEFAULT.to_string(),
            connect_timeout_ms: ETCD_CONNECT_TIMEOUT_MS_DEFAULT,
            request_timeout_ms: ETCD_REQUEST_TIMEOUT_MS_DEFAULT,
            credentials: None,
            tls_ca_file: None,
            tls_domain_name: None,
            tls_client_identity: None,
            lease: LeaseConfig::default(),
            clock: None,
        }
    }

    /// Options for the endpoints in [`ETCD_ENDPOINTS_ENV`], or `Ok(None)` if it is unset or
    /// blank. A malformed list is an error.
    pub fn from_env() -> Result<Option<Self>, StoreError> {
        match std::env::var(ETCD_ENDPOINTS_ENV) {
            Ok(list) if !list.trim().is_empty() => Ok(Some(Self::new(parse_endpoints(&list)?))),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(invalid(
                ETCD_ENDPOINTS_ENV,
                "is not valid UTF-8".to_string(),
            )),
        }
    }

    /// Sets the key prefix.
    pub fn with_key_prefix(mut self, key_prefix: impl Into<String>) -> Self {
        self.key_prefix = key_prefix.into();
        self
    }

    /// Sets the connect timeout.
    pub fn with_connect_timeout_ms(mut self, connect_timeout_ms: u64) -> Self {
        self.connect_timeout_ms = connect_timeout_ms;
        self
    }

    /// Sets the per-request timeout.
    pub fn with_request_timeout_ms(mut self, request_timeout_ms: u64) -> Self {
        self.request_timeout_ms = request_timeout_ms;
        self
    }

    /// Authenticates as `username`.
    pub fn with_credentials(
        mut self,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.credentials = Some(EtcdCredentials {
            username: username.into(),
            password: password.into(),
        });
        self
    }

    /// Turns on TLS, trusting the CA certificate(s) in the PEM file at `path`.
    pub fn with_tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca_file = Some(path.into());
        self
    }

    /// Presents the client certificate in the PEM file `cert` with the private key in the PEM
    /// file `key` (for clusters that require client certificates). Needs
    /// [`with_tls_ca_file`](Self::with_tls_ca_file) too.
    pub fn with_tls_client_identity(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls_client_identity = Some((cert.into(), key.into()));
        self
    }

    /// Checks server certificates against `domain_name` instead of the endpoint's host.
    pub fn with_tls_domain_name(mut self, domain_name: impl Into<String>) -> Self {
        self.tls_domain_name = Some(domain_name.into());
        self
    }

    /// Sets the lease duration.
    pub fn with_lease_config(mut self, lease: LeaseConfig) -> Self {
        self.lease = lease;
        self
    }

    /// Reads `Lease` times on `clock` instead of a tokio clock.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Checks every option; the first bad one is an [`StoreError::InvalidOption`].
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.endpoints.is_empty() {
            return Err(invalid("endpoints", "no endpoint given".to_string()));
        }
        if self.endpoints.len() > ETCD_ENDPOINTS_MAX {
            return Err(invalid(
                "endpoints",
                format!(
                    "{} endpoints given; the limit is {ETCD_ENDPOINTS_MAX}",
                    self.endpoints.len()
                ),
            ));
        }
        let tls = self.tls_ca_file.is_some();
        for endpoint in &self.endpoints {
            check_endpoint(endpoint, tls)?;
        }
        check_key_prefix(&self.key_prefix)?;
        check_timeout("connect_timeout_ms", self.connect_timeout_ms)?;
        check_timeout("request_timeout_ms", self.request_timeout_ms)?;
        if let Some(credentials) = &self.credentials {
            if credentials.username.is_empty() {
                return Err(invalid("credentials", "the user name is empty".to_string()));
            }
        }
        if self.tls_domain_name.is_some() && !tls {
            return Err(invalid(
                "tls_domain_name",
                "is set but tls_ca_file is not, so TLS is off".to_string(),
            ));
        }
        if self.tls_client_identity.is_some() && !tls {
            return Err(invalid(
                "tls_client_identity",
                "is set but tls_ca_file is not, so TLS is off".to_string(),
            ));
        }
        Ok(())
    }

    /// The options of each member's etcd client: timeouts, TLS and, if `with_credentials`,
    /// the credentials. Reads the CA file.
    ///
    /// A member that cannot be connected to is passed over for the next one within one
    /// request (see `client.rs`), so each member's connect attempt gets an equal share of the
    /// connect timeout: one pass over every member, each of them unreachable without a word
    /// (a host that is down drops the connection attempt rather than refusing it), then fits
    /// in the connect timeout, and a request still reaches the one member that answers.
    #[cfg(feature = "etcd")]
    pub(super) fn client_options(
        &self,
        with_credentials: bool,
    ) -> Result<ConnectOptions, StoreError> {
        let members = u64::try_from(self.endpoints.len().max(1)).unwrap_or(u64::MAX);
        let member_connect_timeout_ms =
            (self.connect_timeout_ms / members).max(ETCD_TIMEOUT_MS_MIN);
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(member_connect_timeout_ms))
            .with_timeout(Duration::from_millis(self.request_timeout_ms))
            // A member cut off from the cluster fails requests (and watches) at once instead
            // of serving stale reads or hanging: the client then moves on to another member.
            .with_require_leader(true);
        if let Some(credentials) = self.credentials.as_ref().filter(|_| with_credentials) {
            options = options.with_user(&credentials.username, &credentials.password);
        }
        if let Some(path) = &self.tls_ca_file {
            options = options.with_tls(self.tls_options(path)?);
        }
        Ok(options)
    }

    #[cfg(feature = "etcd")]
    fn tls_options(&self, path: &PathBuf) -> Result<TlsOptions, StoreError> {
        let pem = std::fs::read(path).map_err(|e| {
            invalid(
                "tls_ca_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        if !pem
            .windows(CERTIFICATE_PEM_HEADER.len())
            .any(|w| w == CERTIFICATE_PEM_HEADER)
        {
            return Err(invalid(
                "tls_ca_file",
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(pem));
        if let Some(domain_name) = &self.tls_domain_name {
            tls = tls.domain_name(domain_name);
        }
        if let Some((cert_path, key_path)) = &self.tls_client_identity {
            let cert = read_pem("tls_client_identity", cert_path, CERTIFICATE_PEM_HEADER)?;
            let key = read_pem("tls_client_identity", key_path, PRIVATE_KEY_PEM_MARK)?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Ok(tls)
    }
}

#[cfg(feature = "etcd")]
const CERTIFICATE_PEM_HEADER: &[u8] = b"-----BEGIN CERTIFICATE-----";
#[cfg(feature = "etcd")]
/// In every PEM private key's header (`PRIVATE KEY`, `RSA PRIVATE KEY`, `EC PRIVATE KEY`).
const PRIVATE_KEY_PEM_MARK: &[u8] = b"PRIVATE KEY-----";

/// The PEM file at `path`, which must contain `mark`.
#[cfg(feature = "etcd")]
fn read_pem(option: &str, path: &PathBuf, mark: &[u8]) -> Result<Vec<u8>, StoreError> {
    let pem = std::fs::read(path)
        .map_err(|e| invalid(option, format!("cannot read {}: {e}", path.display())))?;
    if !pem.windows(mark.len()).any(|w| w == mark) {
        let what = String::from_utf8_lossy(mark)
            .trim_matches('-')
            .to_lowercase();
        return Err(invalid(
            option,
            format!("{} holds no PEM {what}", path.display()),
        ));
    }
    Ok(pem)
}

impl fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let clock = if self.clock.is_some() {
            "given"
        } else {
            "tokio"
        };
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("credentials", &self.credentials)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_domain_name", &self.tls_domain_name)
            .field("tls_client_identity", &self.tls_client_identity)
            .field("lease", &self.lease)
            .field("clock", &clock)
            .finish()
    }
}

/// The port assumed for an endpoint given without one (etcd's client port).
pub const ETCD_PORT_DEFAULT: u16 = 2379;

/// Splits a comma-separated endpoint list (as in [`ETCD_ENDPOINTS_ENV`] or after `etcd://` in a
/// store URL) and checks each entry has a valid form; an entry without a port gets
/// [`ETCD_PORT_DEFAULT`]. Blank entries are refused rather than skipped, because `a,,b` is a
/// typo, and so are more than [`ETCD_ENDPOINTS_MAX`] entries. The only endpoint parser: the
/// CLI's `etcd://` URLs come here too.
pub fn parse_endpoints(list: &str) -> Result<Vec<String>, StoreError> {
    let list = list.trim().trim_end_matches('/');
    if list.is_empty() {
        return Err(invalid(
            "endpoints",
            "no endpoint given; expected HOST:PORT[,HOST:PORT...]".to_string(),
        ));
    }
    let endpoints: Vec<String> = list.split(',').map(with_default_port).collect();
    if endpoints.len() > ETCD_ENDPOINTS_MAX {
        return Err(invalid(
            "endpoints",
            format!(
                "{} endpoints given; the limit is {ETCD_ENDPOINTS_MAX}",
                endpoints.len()
            ),
        ));
    }
    for endpoint in &endpoints {
        check_endpoint(endpoint, false)?;
    }
    Ok(endpoints)
}

/// `host` becomes `host:2379`; an entry that names a port (or is blank) is kept as is.
fn with_default_port(entry: &str) -> String {
    let entry = entry.trim();
    let authority = entry.split_once("://").map_or(entry, |(_, rest)| rest);
    let authority = authority.trim_end_matches('/');
    // An IPv6 address is bracketed, so its colons are not taken for the port's.
    let after_host = authority
        .rsplit_once(']')
        .map_or(authority, |(_, rest)| rest);
    if entry.is_empty() || after_host.contains(':') {
        entry.to_string()
    } else {
        format!("{}:{ETCD_PORT_DEFAULT}", entry.trim_end_matches('/'))
    }
}

fn check_endpoint(endpoint: &str, tls: bool) -> Result<(), StoreError> {
    let bad = |reason: &str| invalid("endpoints", format!("{endpoint:?}: {reason}"));
    let (scheme, rest) = match endpoint.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, endpoint),
    };
    match (scheme, tls) {
        (None, _) | (Some("https"), true) | (Some("http"), false) => {}
        (Some("http"), true) => return Err(bad("an http:// endpoint with TLS turned on")),
        (Some("https"), false) => return Err(bad("an https:// endpoint needs tls_ca_file")),
        (Some(_), _) => return Err(bad("the scheme must be http:// or https://")),
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err(bad("expected host:port"));
    };
    if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
        return Err(bad("the host is empty or contains a path, query or user"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad("the port must be a number in 1..=65535")),
        Ok(_) => Ok(()),
    }
}

pub(super) fn check_key_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() {
        // An empty prefix would make every key in the cluster look like a lease.
        return Err(invalid("key_prefix", "is empty".to_string()));
    }
    if prefix.len() > ETCD_KEY_PREFIX_BYTES_MAX {
        return Err(invalid(
            "key_prefix",
            format!(
                "is {} bytes long; the limit is {ETCD_KEY_PREFIX_BYTES_MAX}",
                prefix.len()
            ),
        ));
    }
    Ok(())
}

pub(super) fn check_timeout(option: &str, timeout_ms: u64) -> Result<(), StoreError> {
    if (ETCD_TIMEOUT_MS_MIN..=ETCD_TIMEOUT_MS_MAX).contains(&timeout_ms) {
        return Ok(());
    }
    Err(invalid(
        option,
        format!("{timeout_ms} ms is outside {ETCD_TIMEOUT_MS_MIN}..={ETCD_TIMEOUT_MS_MAX} ms"),
    ))
}

fn invalid(option: &str, reason: String) -> StoreError {
    StoreError::InvalidOption {
        option: option.to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms_are_checked() {
        for good in ["127.0.0.1:2379", "http://etcd-0:2379", "http://[::1]:2379/"] {
            assert!(check_endpoint(good, false).is_ok(), "{good}");
        }
        assert!(check_endpoint("https://etcd-0:2379", true).is_ok());
        for bad in [
            "",
            "etcd-0",
            "http://etcd-0",
            "http://:2379",
            "http://etcd-0:0",
            "http://etcd-0:99999",
            "ftp://etcd-0:2379",
            "http://etcd-0:2379/path",
            "https://etcd-0:2379",
        ] {
            let err = check_endpoint(bad, false).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidOption { ref option, .. } if option == "endpoints"),
                "{bad}: {err:?}"
            );
        }
        assert!(check_endpoint("http://etcd-0:2379", true).is_err());
    }

    #[test]
    fn endpoint_lists_refuse_blank_entries() {
        assert_eq!(
            parse_endpoints(" 127.0.0.1:1 ,http://h:2").unwrap(),
            vec!["127.0.0.1:1", "http://h:2"]
        );
        assert!(parse_endpoints("127.0.0.1:1,,127.0.0.1:2").is_err());
    }

    #[test]
    fn endpoint_lists_take_the_default_port_and_a_bounded_count() {
        assert_eq!(
            parse_endpoints("10.0.0.1:2379,etcd-b,[::1]:32379,[::2]/").unwrap(),
            vec!["10.0.0.1:2379", "etcd-b:2379", "[::1]:32379", "[::2]:2379"]
        );
        for bad in ["", "/", "h:0", "h:99999", "h:x", ":1", "a,,b", "h a:1"] {
            assert!(parse_endpoints(bad).is_err(), "{bad:?} accepted");
        }
        let many = vec!["h:1"; ETCD_ENDPOINTS_MAX + 1].join(",");
        let refused = parse_endpoints(&many).unwrap_err().to_string();
        assert!(refused.contains("the limit is"), "{refused}");
        let most = vec!["h:1"; ETCD_ENDPOINTS_MAX].join(",");
        assert_eq!(parse_endpoints(&most).unwrap().len(), ETCD_ENDPOINTS_MAX);
    }

    #[test]
    fn options_are_validated() {
        let good = EtcdOptions::new(["127.0.0.1:2379"]);
        assert!(good.validate().is_ok());
        let cases = [
            (EtcdOptions::new(Vec::<String>::new()), "endpoints"),
            (good.clone().with_key_prefix(""), "key_prefix"),
            (good.clone().with_key_prefix("k".repeat(513)), "key_prefix"),
            (
                good.clone().with_connect_timeout_ms(0),
                "connect_timeout_ms",
            ),
            (
                good.clone()
                    .with_request_timeout_ms(ETCD_TIMEOUT_MS_MAX + 1),
                "request_timeout_ms",
            ),
            (good.clone().with_credentials("", "pw"), "credentials"),
            (good.clone().with_tls_domain_name("etcd"), "tls_domain_name"),
        ];
        for (options, expected) in cases {
            match options.validate() {
                Err(StoreError::InvalidOption { option, .. }) => assert_eq!(option, expected),
                other => panic!("{expected}: {other:?}"),
            }
        }
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn missing_or_bogus_ca_file_is_an_invalid_option() {
        let dir = tempfile::tempdir().unwrap();
        let missing = EtcdOptions::new(["127.0.0.1:2379"]).with_tls_ca_file(dir.path().join("no"));
        let bogus_path = dir.path().join("bogus.pem");
        std::fs::write(&bogus_path, "not a certificate").unwrap();
        let bogus = EtcdOptions::new(["127.0.0.1:2379"]).with_tls_ca_file(&bogus_path);
        for options in [missing, bogus] {
            let err = options.client_options(true).unwrap_err();
            assert!(
                matches!(err, StoreError::InvalidOption { ref option, .. } if option == "tls_ca_file"),
                "{err:?}"
            );
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let options = EtcdOptions::new(["127.0.0.1:2379"]).with_credentials("kelpie", "s3cret");
        let shown = format!("{options:?}");
        assert!(
            shown.contains("kelpie") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
}
