//! SASL against the test broker's SASL listener (see scripts/kafka): SCRAM with the password
//! from the environment, PLAIN with it from a mounted file, and a wrong password; SASL over
//! TLS, with the CA certificate and the password from files. The password never shows in
//! logs, /status, /metrics or error messages.

use std::time::Duration;

use crate::support::*;

fn sasl() -> &'static SaslListener {
    broker().sasl.as_ref().expect(
        "these tests need the broker's SASL listener: scripts/kafka starts one; for another broker set \
         KAFKA_SASL_BOOTSTRAP_SERVERS, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD",
    )
}

/// Settings for the SASL user at `bootstrap` over `protocol` (SASL_PLAINTEXT or SASL_SSL),
/// with `mechanism`; the password comes separately.
fn sasl_env(bootstrap: &str, protocol: &str, mechanism: &str) -> Vec<(String, String)> {
    [
        ("WEIR__KAFKA__BOOTSTRAP_SERVERS", bootstrap),
        ("WEIR__KAFKA__OPTIONS__SECURITY_PROTOCOL", protocol),
        ("WEIR__KAFKA__OPTIONS__SASL_MECHANISM", mechanism),
        ("WEIR__KAFKA__OPTIONS__SASL_USERNAME", sasl().user.as_str()),
        // Everything weir logs, so that a leak anywhere shows.
        ("WEIR__LOGGING__LEVEL", "debug"),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value.to_string()))
    .collect()
}

fn assert_hidden(what: &str, text: &str, password: &str) {
    assert!(!text.contains(password), "the SASL password shows in {what}:\n{text}");
}

#[test]
fn sasl_scram_and_plain_run_and_the_password_never_shows() {
    let password = sasl().password.clone();
    let (input, output) = (unique("sasl-in"), unique("sasl-out"));
    create_topic(&input, 2);
    create_topic(&output, 2);
    produce(&input, (0..200u64).map(|id| Input::keyed(format!("k{id}"), event(id))));
    let expected = kept_by_amount_filter(0..200);

    // SCRAM-SHA-512, the password in an environment variable; a long-running process whose
    // HTTP endpoints are read while it holds the credentials.
    let name = unique("sasl-scram");
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 10.0\""));
    let mut env = sasl_env(&sasl().bootstrap, "SASL_PLAINTEXT", "SCRAM-SHA-512");
    env.push(("WEIR__KAFKA__OPTIONS__SASL_PASSWORD".into(), password.clone()));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { env, ..Default::default() });
    wait_until(Duration::from_secs(60), "offsets committed to the end over SASL", || {
        committed_offsets(&name, &input) == end_offsets(&input)
    });
    assert_exactly_once(&output, &expected);
    let (_, status) = weir.http_get("/status").expect("/status answers");
    let report: serde_json::Value = serde_json::from_str(&status).unwrap_or_else(|error| panic!("{error}: {status}"));
    assert_eq!(report["records_in"], 200, "{report:#}");
    assert_hidden("/status", &status, &password);
    let (_, metrics) = weir.http_get("/metrics").expect("/metrics answers");
    assert!(metrics.contains("weir_records_in_total"), "{metrics}");
    assert_hidden("/metrics", &metrics, &password);
    weir.terminate();
    assert!(weir.wait(Duration::from_secs(30)).success(), "{}", weir.log_text());
    assert_hidden("the log", &weir.log_text(), &password);

    // PLAIN, the password in a mounted file (as a Kubernetes Secret volume gives it, with a
    // trailing newline), over new input from where the first run stopped.
    produce(&input, (200..300u64).map(|id| Input::keyed(format!("k{id}"), event(id))));
    let secret_file = pipeline.path.with_file_name("sasl-password");
    std::fs::write(&secret_file, format!("{password}\n")).unwrap();
    let mut env = sasl_env(&sasl().bootstrap, "SASL_PLAINTEXT", "PLAIN");
    env.push(("WEIR__KAFKA__OPTION_FILES__SASL_PASSWORD".into(), secret_file.display().to_string()));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { env, until_end: true, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(60)).success(), "{}", weir.log_text());
    assert_hidden("the log", &weir.log_text(), &password);
    assert_exactly_once(&output, &kept_by_amount_filter(0..300));
}

/// A wrong password: weir stops with an error that says authentication failed, and neither
/// the error nor the log shows the password it tried.
#[test]
fn a_wrong_sasl_password_fails_clearly_without_showing_it() {
    let wrong = format!("{}-but-wrong", sasl().password);
    let input = unique("sasl-in");
    create_topic(&input, 1);
    let name = unique("sasl-wrong");
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &unique("sasl-out"), "  []"));
    let mut env = sasl_env(&sasl().bootstrap, "SASL_PLAINTEXT", "SCRAM-SHA-256");
    env.push(("WEIR__KAFKA__OPTIONS__SASL_PASSWORD".into(), wrong.clone()));
    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { env, ..Default::default() });
    let mut status = None;
    wait_until(Duration::from_secs(90), "weir to give up on authentication", || {
        if let Some((_, body)) = weir.http_get("/status") {
            status = Some(body);
        }
        weir.child.try_wait().unwrap().is_some()
    });
    let log = weir.log_text();
    assert!(!weir.wait(Duration::from_secs(1)).success(), "{log}");
    assert!(log.to_lowercase().contains("authentication"), "the error should say authentication failed:\n{log}");
    assert_hidden("the log", &log, &wrong);
    if let Some(status) = status {
        assert_hidden("/status", &status, &wrong);
    }
}

fn tls() -> &'static TlsListener {
    broker().tls.as_ref().expect(
        "this test needs the broker's SASL_SSL listener: scripts/kafka starts one; for another broker set \
         KAFKA_TLS_BOOTSTRAP_SERVERS and KAFKA_TLS_CA_LOCATION",
    )
}

/// SASL_SSL: the broker's certificate verified against a CA file, the password read from a
/// file, as a Kubernetes Secret volume provides both. Without the CA the handshake fails at
/// once, and weir says so.
#[test]
fn sasl_over_tls_with_the_ca_and_password_from_files() {
    let password = sasl().password.clone();
    let (input, output) = (unique("tls-in"), unique("tls-out"));
    create_topic(&input, 2);
    create_topic(&output, 2);
    produce(&input, (0..100u64).map(|id| Input::keyed(format!("k{id}"), event(id))));
    let name = unique("tls");
    let pipeline = pipeline_file(&json_pipeline(&name, &input, &output, "  - filter: \"amount > 10.0\""));
    let secret_file = pipeline.path.with_file_name("sasl-password");
    std::fs::write(&secret_file, format!("{password}\n")).unwrap();
    let env = |with_ca: bool| {
        let mut env = sasl_env(&tls().bootstrap, "SASL_SSL", "SCRAM-SHA-256");
        env.push(("WEIR__KAFKA__OPTION_FILES__SASL_PASSWORD".into(), secret_file.display().to_string()));
        if with_ca {
            env.push(("WEIR__KAFKA__OPTIONS__SSL_CA_LOCATION".into(), tls().ca_location.display().to_string()));
        }
        env
    };

    let mut untrusted = WeirProcess::start(&pipeline.path, WeirOptions { env: env(false), until_end: true, ..Default::default() });
    let status = untrusted.wait(Duration::from_secs(60));
    let log = untrusted.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("certificate verify failed"), "the error should say the certificate was not trusted:\n{log}");
    assert_hidden("the log", &log, &password);

    let mut weir = WeirProcess::start(&pipeline.path, WeirOptions { env: env(true), until_end: true, ..Default::default() });
    assert!(weir.wait(Duration::from_secs(60)).success(), "{}", weir.log_text());
    assert_hidden("the log", &weir.log_text(), &password);
    assert_exactly_once(&output, &kept_by_amount_filter(0..100));
}
