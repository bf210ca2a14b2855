//! Connecting to etcd: bad options are typed errors, an unreachable or silent etcd is
//! `Unavailable` within the timeout, an etcd that goes away fails requests within the request
//! timeout, and credentials are checked. The first group needs no etcd at all.

mod etcd_support;

use std::net::TcpListener;

use etcd_support::{private_etcd_binary, EtcdMember, Stopwatch};
use kelpie_core::{ActorId, NodeId};
use kelpie_lease::{EtcdLeaseManager, EtcdOptions, LeaseError, LeaseManager, StoreError};

/// The connect timeout these tests use.
const CONNECT_TIMEOUT_MS: u64 = 500;

/// Scheduling slack allowed on top of a timeout on a loaded two-core machine.
const TIMING_SLACK_MS: u64 = 1_500;

async fn connect_error(options: EtcdOptions) -> StoreError {
    match EtcdLeaseManager::connect(options).await {
        Ok(_) => panic!("connected where it should not have"),
        Err(error) => error,
    }
}

#[tokio::test]
async fn bad_options_are_invalid_option_errors() {
    let cases = [
        (EtcdOptions::new(["not a url"]), "endpoints"),
        (EtcdOptions::new(["http://127.0.0.1:0"]), "endpoints"),
        (EtcdOptions::new(Vec::<String>::new()), "endpoints"),
        (
            EtcdOptions::new(["127.0.0.1:2379"]).with_key_prefix(""),
            "key_prefix",
        ),
        (
            EtcdOptions::new(["127.0.0.1:2379"]).with_connect_timeout_ms(0),
            "connect_timeout_ms",
        ),
        (
            EtcdOptions::new(["127.0.0.1:2379"]).with_tls_ca_file("/nonexistent/ca.pem"),
            "tls_ca_file",
        ),
    ];
    for (options, expected) in cases {
        match connect_error(options).await {
            StoreError::InvalidOption { option, .. } => assert_eq!(option, expected),
            other => panic!("{expected}: expected InvalidOption, got {other:?}"),
        }
    }
}

#[test]
fn a_malformed_endpoint_list_is_an_invalid_option() {
    let error =
        kelpie_lease::backend::parse_endpoints("127.0.0.1:2379,,127.0.0.1:2380").unwrap_err();
    assert!(
        matches!(error, StoreError::InvalidOption { .. }),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_is_unavailable_within_the_connect_timeout() {
    let closed_port = etcd_support::free_port();
    let options = EtcdOptions::new([
        format!("http://127.0.0.1:{closed_port}"),
        format!("127.0.0.1:{}", etcd_support::free_port()),
    ])
    .with_connect_timeout_ms(CONNECT_TIMEOUT_MS);
    let watch = Stopwatch::start();
    let error = connect_error(options).await;
    let elapsed_ms = watch.elapsed_ms();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(
        elapsed_ms <= CONNECT_TIMEOUT_MS + TIMING_SLACK_MS,
        "took {elapsed_ms} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_unavailable_within_the_connect_timeout() {
    // The kernel completes the TCP handshake on the listener's backlog, but nothing ever
    // answers the HTTP/2 preface: the client must give up on its own.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let options =
        EtcdOptions::new([format!("127.0.0.1:{port}")]).with_connect_timeout_ms(CONNECT_TIMEOUT_MS);
    let watch = Stopwatch::start();
    let error = connect_error(options).await;
    let elapsed_ms = watch.elapsed_ms();
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(
        elapsed_ms <= CONNECT_TIMEOUT_MS + TIMING_SLACK_MS,
        "took {elapsed_ms} ms"
    );
    drop(listener);
}

/// Attempts to connect to a freshly started member before the test gives up on it.
const SETUP_ATTEMPTS_MAX: u32 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_that_goes_away_fails_requests_within_the_request_timeout() {
    let Some(binary) = private_etcd_binary("etcd_connect::goes_away") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdMember::start_single(&binary, dir.path(), "http", &[]);
    let request_timeout_ms = 500;
    let options = EtcdOptions::new([etcd.endpoint()]).with_request_timeout_ms(request_timeout_ms);
    let (actor, node) = (ActorId::new("a").unwrap(), NodeId::new("n1").unwrap());
    // A member that just started may answer its first requests slower than the short timeout
    // under test (CI builds on the same two cores); the setup retries, the assertions don't.
    let mut setup = None;
    for _ in 0..SETUP_ATTEMPTS_MAX {
        if let Ok(manager) = EtcdLeaseManager::connect(options.clone()).await {
            if manager.acquire(&actor, &node).await.is_ok() {
                setup = Some(manager);
                break;
            }
        }
    }
    let manager = setup.expect("a fresh etcd member accepts a connection and an acquire");
    etcd.kill();
    for op in ["acquire", "renew", "get"] {
        let watch = Stopwatch::start();
        let error = match op {
            "acquire" => manager.acquire(&actor, &node).await.unwrap_err(),
            "renew" => manager.renew(&actor, &node).await.unwrap_err(),
            _ => manager.get(&actor).await.unwrap_err(),
        };
        let elapsed_ms = watch.elapsed_ms();
        // Renew writes the key before its keepalive, so its failure may be "outcome unknown".
        assert!(
            matches!(
                error,
                LeaseError::Store(
                    StoreError::Unavailable { .. } | StoreError::CommitUnknown { .. }
                )
            ),
            "{op}: {error:?}"
        );
        // A keepalive may wait for one in flight ahead of it and then its own.
        assert!(
            elapsed_ms <= 2 * request_timeout_ms + TIMING_SLACK_MS,
            "{op} took {elapsed_ms} ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked() {
    let Some(binary) = private_etcd_binary("etcd_connect::credentials") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdMember::start_single(&binary, dir.path(), "http", &[]);
    enable_auth(&etcd.endpoint(), "root", "kelpie-root-pw").await;

    let good = EtcdOptions::new([etcd.endpoint()]).with_credentials("root", "kelpie-root-pw");
    let manager = EtcdLeaseManager::connect(good).await.unwrap();
    let (actor, node) = (ActorId::new("a").unwrap(), NodeId::new("n1").unwrap());
    manager.acquire(&actor, &node).await.unwrap();

    let wrong = EtcdOptions::new([etcd.endpoint()]).with_credentials("root", "wrong");
    let error = connect_error(wrong).await;
    assert!(
        matches!(error, StoreError::AccessDenied { .. }),
        "{error:?}"
    );
    let anonymous = EtcdOptions::new([etcd.endpoint()]);
    let error = connect_error(anonymous).await;
    assert!(
        matches!(error, StoreError::AccessDenied { .. }),
        "{error:?}"
    );
}

/// Creates `user` with the root role and turns authentication on.
async fn enable_auth(endpoint: &str, user: &str, password: &str) {
    let mut client = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    client.user_add(user, password, None).await.unwrap();
    client.user_grant_role(user, "root").await.unwrap();
    client.auth_enable().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file() {
    let Some(binary) = private_etcd_binary("etcd_connect::tls") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(certs) = make_certificates(dir.path()) else {
        etcd_support::skip("etcd_connect::tls", "the openssl command is not available");
        return;
    };
    let cert_args = [
        "--cert-file",
        &certs.server_cert,
        "--key-file",
        &certs.server_key,
    ];
    let etcd = EtcdMember::start_single(&binary, dir.path(), "https", &cert_args);
    let endpoint = format!("https://127.0.0.1:{}", etcd.client_port);

    let trusted = EtcdOptions::new([endpoint.clone()]).with_tls_ca_file(&certs.ca_cert);
    let manager = EtcdLeaseManager::connect(trusted).await.unwrap();
    let (actor, node) = (ActorId::new("a").unwrap(), NodeId::new("n1").unwrap());
    manager.acquire(&actor, &node).await.unwrap();

    // A CA that did not sign the server's certificate: the handshake fails, in time.
    let untrusted = EtcdOptions::new([endpoint.clone()])
        .with_tls_ca_file(&certs.other_ca_cert)
        .with_connect_timeout_ms(CONNECT_TIMEOUT_MS);
    let watch = Stopwatch::start();
    let error = connect_error(untrusted).await;
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
    assert!(watch.elapsed_ms() <= CONNECT_TIMEOUT_MS + TIMING_SLACK_MS);
    // Plain HTTP to a TLS endpoint is refused before anything is sent.
    let plain = EtcdOptions::new([endpoint.replace("https", "http")]);
    let error = connect_error(plain.with_connect_timeout_ms(CONNECT_TIMEOUT_MS)).await;
    assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
}

/// Paths of a throwaway CA, a server certificate it signed for 127.0.0.1, client
/// certificates signed by it and by an unrelated CA, and that CA.
struct Certificates {
    ca_cert: String,
    other_ca_cert: String,
    server_cert: String,
    server_key: String,
    /// A client certificate and key signed by `ca_cert`.
    client: (String, String),
    /// A client certificate and key signed by `other_ca_cert`.
    rogue_client: (String, String),
}

/// Makes [`Certificates`] in `dir` with the openssl command, or `None` if it is missing.
fn make_certificates(dir: &std::path::Path) -> Option<Certificates> {
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let openssl = |args: &[&str]| {
        let output = std::process::Command::new("openssl").args(args).output();
        match output {
            Ok(output) if output.status.success() => Some(()),
            Ok(output) => panic!(
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(_) => None,
        }
    };
    for ca in ["ca", "other-ca"] {
        let (key, cert) = (path(&format!("{ca}.key")), path(&format!("{ca}.pem")));
        let subject = format!("/CN=kelpie-test-{ca}");
        openssl(&[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &cert,
            "-days", "1", "-subj", &subject,
        ])?;
    }
    let extensions = path("server.ext");
    std::fs::write(
        &extensions,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         extendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let (server_key, csr, server_cert) =
        (path("server.key"), path("server.csr"), path("server.pem"));
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &server_key,
        "-out",
        &csr,
        "-subj",
        "/CN=127.0.0.1",
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &path("ca.pem"),
        "-CAkey",
        &path("ca.key"),
        "-CAcreateserial",
        "-out",
        &server_cert,
        "-days",
        "1",
        "-extfile",
        &extensions,
    ])?;
    let client_extensions = path("client.ext");
    std::fs::write(
        &client_extensions,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let mut clients = Vec::new();
    for (name, ca) in [("client", "ca"), ("rogue-client", "other-ca")] {
        let (key, csr, cert) = (
            path(&format!("{name}.key")),
            path(&format!("{name}.csr")),
            path(&format!("{name}.pem")),
        );
        let subject = format!("/CN=kelpie-test-{name}");
        openssl(&[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
            &subject,
        ])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &path(&format!("{ca}.pem")),
            "-CAkey",
            &path(&format!("{ca}.key")),
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "1",
            "-extfile",
            &client_extensions,
        ])?;
        clients.push((cert, key));
    }
    let rogue_client = clients.pop().expect("two clients");
    let client = clients.pop().expect("two clients");
    Some(Certificates {
        ca_cert: path("ca.pem"),
        other_ca_cert: path("other-ca.pem"),
        server_cert,
        server_key,
        client,
        rogue_client,
    })
}

/// A cluster that requires client certificates (`--client-cert-auth`): a client presenting a
/// certificate its CA signed works; one presenting none, or one another CA signed, is refused
/// within the connect timeout. A client identity without TLS, or files that are not PEM, are
/// refused before connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let Some(binary) = private_etcd_binary("etcd_connect::client_certificates") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let Some(certs) = make_certificates(dir.path()) else {
        etcd_support::skip(
            "etcd_connect::client_certificates",
            "the openssl command is not available",
        );
        return;
    };
    let cert_args = [
        "--cert-file",
        &certs.server_cert,
        "--key-file",
        &certs.server_key,
        "--client-cert-auth",
        "--trusted-ca-file",
        &certs.ca_cert,
    ];
    let etcd = EtcdMember::start_single(&binary, dir.path(), "https", &cert_args);
    let endpoint = format!("https://127.0.0.1:{}", etcd.client_port);
    let tls = || EtcdOptions::new([endpoint.clone()]).with_tls_ca_file(&certs.ca_cert);

    let (cert, key) = &certs.client;
    let manager = EtcdLeaseManager::connect(tls().with_tls_client_identity(cert, key))
        .await
        .unwrap();
    let (actor, node) = (ActorId::new("a").unwrap(), NodeId::new("n1").unwrap());
    manager.acquire(&actor, &node).await.unwrap();

    for (what, options) in [
        ("no client certificate", tls()),
        (
            "a client certificate another CA signed",
            tls().with_tls_client_identity(&certs.rogue_client.0, &certs.rogue_client.1),
        ),
    ] {
        let watch = Stopwatch::start();
        let error = connect_error(options.with_connect_timeout_ms(CONNECT_TIMEOUT_MS)).await;
        assert!(
            matches!(
                error,
                StoreError::Unavailable { .. } | StoreError::AccessDenied { .. }
            ),
            "{what}: {error:?}"
        );
        assert!(
            watch.elapsed_ms() <= CONNECT_TIMEOUT_MS + TIMING_SLACK_MS,
            "{what}: refused after {} ms",
            watch.elapsed_ms()
        );
    }

    let without_tls = EtcdOptions::new([etcd.endpoint()]).with_tls_client_identity(cert, key);
    let error = connect_error(without_tls).await;
    assert!(
        matches!(&error, StoreError::InvalidOption { option, .. } if option == "tls_client_identity"),
        "{error:?}"
    );
    let not_pem = tls().with_tls_client_identity(&certs.ca_cert, &certs.ca_cert);
    let error = connect_error(not_pem).await;
    assert!(
        matches!(&error, StoreError::InvalidOption { reason, .. } if reason.contains("private key")),
        "{error:?}"
    );
}

/// Rounds of a fresh manager and a lease's whole life in `a_dead_endpoint_is_passed_over`:
/// with the requests balanced over a live and a dead member, about half of them failed, so
/// all of these rounds passed by chance about once in 2^(6 × this).
const DEAD_ENDPOINT_ROUNDS: usize = 5;

/// One member of the endpoint list is down (nothing listens on its port): connecting, every
/// lease operation and a fenced state write still succeed, each time, whichever place in the
/// list the dead member has. Each request that meets the dead member is sent again to the live
/// one, inside the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_is_passed_over() {
    let Some(options) = etcd_support::shared_etcd("etcd_connect::dead_endpoint") else {
        return;
    };
    let live = options.endpoints[0].clone();
    let dead = format!("http://127.0.0.1:{}", etcd_support::free_port());
    let (actor, node) = (ActorId::new("a").unwrap(), NodeId::new("n1").unwrap());
    for endpoints in [[&dead, &live], [&live, &dead]] {
        for round in 0..DEAD_ENDPOINT_ROUNDS {
            let what = format!("{endpoints:?}, round {round}");
            let mut options = options.clone();
            options.endpoints = endpoints.iter().map(|e| e.to_string()).collect();
            let manager = EtcdLeaseManager::connect(options)
                .await
                .unwrap_or_else(|e| panic!("{what}: connect: {e}"));
            let lease = (manager.acquire(&actor, &node).await)
                .unwrap_or_else(|e| panic!("{what}: acquire: {e}"));
            let state = manager.fenced_state_store();
            kelpie_lease::FencedStateStore::fence(&state, &actor, lease.fencing_token)
                .await
                .unwrap_or_else(|e| panic!("{what}: fence: {e}"));
            kelpie_lease::FencedStateStore::write(&state, &actor, lease.fencing_token, b"v")
                .await
                .unwrap_or_else(|e| panic!("{what}: state write: {e}"));
            let got = manager.get(&actor).await;
            let got = got.unwrap_or_else(|e| panic!("{what}: get: {e}"));
            assert_eq!(got.map(|l| l.fencing_token), Some(lease.fencing_token));
            (manager.renew(&actor, &node).await).unwrap_or_else(|e| panic!("{what}: renew: {e}"));
            (manager.release(&actor, &node).await)
                .unwrap_or_else(|e| panic!("{what}: release: {e}"));
        }
    }
}

/// Members of the cluster in `writes_move_on_when_their_member_dies`.
const CLUSTER_MEMBERS: usize = 3;

/// How long the test waits for a freshly started cluster to elect a leader, or for leadership
/// to move.
const LEADER_WAIT_MS: u64 = 20_000;

/// A three-member cluster; the member the manager's requests go to (never the leader, so that
/// no election follows) is killed while the manager holds a lease. The next writes, whose first
/// attempt meets the dead member, are sent to the next member and succeed: the renewal, a new
/// acquire and a fenced state write, and the requests go to a live member from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_move_on_when_their_member_dies() {
    let Some(binary) = private_etcd_binary("etcd_connect::member_dies") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut members = EtcdMember::start_cluster(&binary, dir.path(), CLUSTER_MEMBERS, &[]);
    let endpoints: Vec<String> = members.iter().map(EtcdMember::endpoint).collect();
    let leader = wait_for_leader(&endpoints).await;
    let manager = EtcdLeaseManager::connect(EtcdOptions::new(endpoints.clone()))
        .await
        .unwrap();
    let (a, b, node) = (
        ActorId::new("a").unwrap(),
        ActorId::new("b").unwrap(),
        NodeId::new("n1").unwrap(),
    );
    manager.acquire(&a, &node).await.unwrap();
    let preferred = manager.api().preferred_endpoint().to_string();
    if preferred == endpoints[leader] {
        move_leadership_away(&preferred, &endpoints).await;
    }
    let victim = endpoints.iter().position(|e| *e == preferred).unwrap();
    members[victim].kill();
    // Let the client's connection to it see the close, so that the next request is not sent
    // on it (which would make its outcome unknown) but finds no connection to make.
    etcd_support::sleep_ms(300).await;

    let renewed = manager.renew(&a, &node).await;
    assert!(renewed.is_ok(), "renew after its member died: {renewed:?}");
    let lease = manager.acquire(&b, &node).await.unwrap();
    let state = manager.fenced_state_store();
    kelpie_lease::FencedStateStore::fence(&state, &b, lease.fencing_token)
        .await
        .unwrap();
    kelpie_lease::FencedStateStore::write(&state, &b, lease.fencing_token, b"v")
        .await
        .unwrap();
    assert_ne!(manager.api().preferred_endpoint(), preferred);
}

/// The index of the member that leads, once one does.
async fn wait_for_leader(endpoints: &[String]) -> usize {
    let waited = Stopwatch::start();
    loop {
        for (index, endpoint) in endpoints.iter().enumerate() {
            if let Some((own, leader)) = member_status(endpoint).await {
                if own == leader {
                    return index;
                }
            }
        }
        assert!(waited.elapsed_ms() < LEADER_WAIT_MS, "no leader elected");
        etcd_support::sleep_ms(100).await;
    }
}

/// A member's own id and the id of the leader it knows, if it answers.
async fn member_status(endpoint: &str) -> Option<(u64, u64)> {
    let asking = async {
        let mut client = etcd_client::Client::connect([endpoint], None).await?;
        client.status().await
    };
    let timeout = std::time::Duration::from_millis(500);
    let status = tokio::time::timeout(timeout, asking).await.ok()?.ok()?;
    Some((status.header()?.member_id(), status.leader()))
}

/// Hands leadership from the member at `leader` to another and waits until it moved.
async fn move_leadership_away(leader: &str, endpoints: &[String]) {
    let other = endpoints.iter().find(|e| *e != leader).unwrap();
    let (target, _) = member_status(other)
        .await
        .expect("the other member answers");
    let mut client = etcd_client::Client::connect([leader], None).await.unwrap();
    client.move_leader(target).await.unwrap();
    let waited = Stopwatch::start();
    while endpoints[wait_for_leader(endpoints).await] == leader {
        assert!(
            waited.elapsed_ms() < LEADER_WAIT_MS,
            "leadership did not move"
        );
        etcd_support::sleep_ms(100).await;
    }
}

/// A write that no member received (the only member is down, so every attempt failed to
/// connect) was never sent: it is reported as unavailable, nothing applied, not as an outcome
/// unknown, which a caller must treat as maybe applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_no_member_received_is_unavailable_not_unknown() {
    let Some(binary) = private_etcd_binary("etcd_connect::no_member_received") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut member = EtcdMember::start_single(&binary, dir.path(), "http", &[]);
    let options = EtcdOptions::new([member.endpoint()]);
    let manager = EtcdLeaseManager::connect(options).await.unwrap();
    let (actor, node) = (ActorId::new("a").unwrap(), NodeId::new("n1").unwrap());
    manager.acquire(&actor, &node).await.unwrap();
    member.kill();
    // Let the client's connection see the close (as in `writes_move_on_when_their_member_dies`):
    // a request sent on it before that may have reached etcd.
    etcd_support::sleep_ms(300).await;
    // A renewal's transaction comes before its keepalive: its failure is the write's own.
    match manager.renew(&actor, &node).await {
        Err(LeaseError::Store(StoreError::Unavailable { reason })) => {
            assert!(reason.contains("not sent"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}
