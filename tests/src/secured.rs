//! A secured broker as a managed Kafka offers it: TLS (terminated by stunnel in front of a
//! tansu broker that advertises the TLS port) and, optionally, SCRAM-SHA-512 and SCRAM-SHA-256
//! users. The CA and the certificates are made fresh with `openssl` for each broker, in a
//! temporary directory; nothing secret is committed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Proc, Restartable, eventually, free_port, unique};

/// SCRAM users every SASL broker has (name, password, tansu mechanism).
pub const USERS: [(&str, &str, &str); 2] = [
    ("hookpipe-512", "s3cret-512-Pw!", "scram512"),
    ("hookpipe-256", "s3cret-256-Pw!", "scram256"),
];

pub struct SecuredBroker {
    pub plain_port: u16,
    pub tls_port: u16,
    pub dir: PathBuf,
    /// The CA that signed the broker's certificate.
    pub ca: PathBuf,
    /// A CA that did not (for the wrong-CA test).
    pub other_ca: PathBuf,
    broker: Restartable,
    stunnel: Option<Proc>,
}

fn run(dir: &Path, program: &str, args: &[&str]) {
    let output = Command::new(program)
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/test installs it)"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn stunnel_program() -> &'static str {
    if Path::new("/usr/bin/stunnel4").exists() {
        "/usr/bin/stunnel4"
    } else {
        "stunnel"
    }
}

impl SecuredBroker {
    /// Starts the broker; with `sasl` its clients must also authenticate with SCRAM.
    pub async fn start(sasl: bool) -> Self {
        let dir = std::env::temp_dir().join(unique("hookpipe-secured"));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, cn) in [("ca", "hookpipe test CA"), ("other-ca", "some other CA")] {
            run(
                &dir,
                "openssl",
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    "1",
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            );
        }
        run(
            &dir,
            "openssl",
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        );
        std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        run(
            &dir,
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ],
        );
        let mut broker = Self {
            plain_port: free_port(),
            tls_port: free_port(),
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            dir,
            broker: Restartable::new("secured-broker"),
            stunnel: None,
        };
        broker.start_stunnel().await;
        broker.start_broker(false).await;
        if sasl {
            // Users are created on the open broker, which then starts again requiring them.
            let tansu = tansu();
            let url = format!("tcp://127.0.0.1:{}", broker.plain_port);
            for (user, password, mechanism) in USERS {
                run(
                    &broker.dir,
                    &tansu,
                    &[
                        "user",
                        "create",
                        "--broker",
                        &url,
                        "--mechanism",
                        mechanism,
                        user,
                        password,
                    ],
                );
            }
            if let Some(mut p) = broker.broker.proc.take() {
                p.terminate(Duration::from_secs(10));
            }
            broker.start_broker(true).await;
        }
        broker
    }

    async fn start_stunnel(&mut self) {
        let conf = self.dir.join("stunnel.conf");
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{}\nconnect = 127.0.0.1:{}\ncert = {}\nkey = {}\n",
                self.tls_port,
                self.plain_port,
                self.dir.join("server.pem").display(),
                self.dir.join("server.key").display()
            ),
        )
        .unwrap();
        self.stunnel = Some(Proc::spawn_program(
            "stunnel",
            stunnel_program(),
            &[conf.display().to_string()],
        ));
        wait_port(self.tls_port).await;
    }

    async fn start_broker(&mut self, authentication: bool) {
        let listener = format!("tcp://127.0.0.1:{}", self.plain_port);
        // Clients are sent to the TLS port: every connection after the first goes through it.
        let advertised = format!("tcp://127.0.0.1:{}", self.tls_port);
        // tansu resolves sqlite:// paths from its working directory (the Restartable's own).
        let storage = "sqlite://tansu.db".to_owned();
        let mut args = vec![
            "broker".to_owned(),
            "--listener-url".into(),
            listener,
            "--advertised-listener-url".into(),
            advertised,
            "--storage-engine".into(),
            storage,
        ];
        if authentication {
            args.push("--authentication".into());
        }
        self.broker.run(&tansu(), &args);
        wait_port(self.plain_port).await;
    }

    /// The address clients bootstrap from (the TLS port).
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.tls_port)
    }

    /// librdkafka properties for the harness's clients: TLS with the right CA, and SCRAM-512
    /// as the first user when the broker requires it.
    pub fn props(&self, sasl: bool) -> Vec<(String, String)> {
        let mut props = vec![
            (
                "security.protocol".into(),
                if sasl { "sasl_ssl" } else { "ssl" }.into(),
            ),
            ("ssl.ca.location".into(), self.ca.display().to_string()),
        ];
        if sasl {
            props.extend([
                ("sasl.mechanism".into(), "SCRAM-SHA-512".into()),
                ("sasl.username".into(), USERS[0].0.into()),
                ("sasl.password".into(), USERS[0].1.into()),
            ]);
        }
        props
    }

    /// The same as the services' settings, for `(user, password, mechanism)` when SASL.
    pub fn env(&self, sasl: Option<(&str, &str, &str)>) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "HOOKPIPE_KAFKA_SECURITY_PROTOCOL".into(),
                if sasl.is_some() { "sasl_ssl" } else { "ssl" }.into(),
            ),
            (
                "HOOKPIPE_KAFKA_SSL_CA_LOCATION".into(),
                self.ca.display().to_string(),
            ),
        ];
        if let Some((user, password, mechanism)) = sasl {
            env.extend([
                ("HOOKPIPE_KAFKA_SASL_MECHANISM".into(), mechanism.into()),
                ("HOOKPIPE_KAFKA_SASL_USERNAME".into(), user.into()),
                ("HOOKPIPE_KAFKA_SASL_PASSWORD".into(), password.into()),
            ]);
        }
        env
    }
}

fn tansu() -> String {
    std::env::var("HOOKPIPE_TEST_TANSU").expect("HOOKPIPE_TEST_TANSU: run through scripts/test")
}

async fn wait_port(port: u16) {
    let addr = format!("127.0.0.1:{port}");
    eventually(
        Duration::from_secs(20),
        &format!("{addr} to listen"),
        || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(addr).await.ok().map(|_| ()) }
        },
    )
    .await;
}

impl Drop for SecuredBroker {
    fn drop(&mut self) {
        if let Some(mut p) = self.stunnel.take() {
            p.kill9();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
