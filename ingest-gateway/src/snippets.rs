//! Ready-to-paste integration snippets: the code a stream's sender adds to its backend to send
//! the order-status example, with the stream's auth (token header or HMAC signature computed
//! in the snippet), an idempotency key, a 2xx check, and retries on 429/503 after Retry-After
//! (and on connection errors). Secrets are never in a snippet: it reads `WEBHOOK_SECRET` from
//! its environment. Nor is the destination table: snippets go to other companies' developers.
//!
//! Each language's code is a template file in its own syntax under `ingest-gateway/snippets/`
//! (compiled in with `include_str!`, rendered with minijinja); the header comment is added
//! here. Every snippet but C# is executed against a real gateway by `tests/tests/snippets.rs`,
//! without auth, with HMAC and with Standard Webhooks signatures.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use hookpipe_common::catalogue::{AuthSpec, SignatureEncoding, Stream};
use minijinja::syntax::SyntaxConfig;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, context};

/// The example every snippet sends: an order status change, as form data.
pub const EXAMPLE_BODY: &str = "orderId=N1&status=delivered&total=120.13&userId=U1";
/// Its idempotency key: one key per order status change, so the same change sent twice (a
/// retry, a resend) is one row.
pub const EXAMPLE_KEY: &str = "N1-delivered";
/// The idempotency header a snippet sends when its stream names none (the gateway's default
/// `HOOKPIPE_IDEMPOTENCY_HEADER`).
pub const DEFAULT_KEY_HEADER: &str = "Idempotency-Key";
/// Where a snippet reads the stream's token or signing secret from.
pub const SECRET_ENV: &str = "WEBHOOK_SECRET";

/// A snippet's language.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lang {
    Curl,
    Python,
    PythonStdlib,
    Node,
    Php,
    Ruby,
    Go,
    Java,
    CSharp,
}

impl Lang {
    pub const ALL: [Lang; 9] = [
        Lang::Curl,
        Lang::Python,
        Lang::PythonStdlib,
        Lang::Node,
        Lang::Php,
        Lang::Ruby,
        Lang::Go,
        Lang::Java,
        Lang::CSharp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Lang::Curl => "curl",
            Lang::Python => "python",
            Lang::PythonStdlib => "python-stdlib",
            Lang::Node => "node",
            Lang::Php => "php",
            Lang::Ruby => "ruby",
            Lang::Go => "go",
            Lang::Java => "java",
            Lang::CSharp => "csharp",
        }
    }

    /// What the snippet is, for its first comment line.
    fn label(self) -> &'static str {
        match self {
            Lang::Curl => "shell (curl)",
            Lang::Python => "Python (requests)",
            Lang::PythonStdlib => "Python (standard library only)",
            Lang::Node => "Node.js 18+ (fetch)",
            Lang::Php => "PHP (curl extension)",
            Lang::Ruby => "Ruby (net/http)",
            Lang::Go => "Go (net/http)",
            Lang::Java => "Java 11+ (java.net.http)",
            Lang::CSharp => "C# (.NET 6+, HttpClient)",
        }
    }

    /// A file name the snippet can be saved and run as.
    pub fn file_name(self) -> &'static str {
        match self {
            Lang::Curl => "send_webhook.sh",
            Lang::Python | Lang::PythonStdlib => "send_webhook.py",
            Lang::Node => "send_webhook.mjs",
            Lang::Php => "send_webhook.php",
            Lang::Ruby => "send_webhook.rb",
            Lang::Go => "main.go",
            Lang::Java => "SendWebhook.java",
            Lang::CSharp => "Program.cs",
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Lang {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let found = match s.as_str() {
            "sh" | "shell" | "bash" => Some(Lang::Curl),
            "python-requests" | "py" => Some(Lang::Python),
            "nodejs" | "javascript" | "js" => Some(Lang::Node),
            "golang" => Some(Lang::Go),
            "c#" | "cs" | "dotnet" => Some(Lang::CSharp),
            _ => Lang::ALL.into_iter().find(|l| l.name() == s),
        };
        found.ok_or_else(|| {
            let names: Vec<&str> = Lang::ALL.iter().map(|l| l.name()).collect();
            format!("unknown language `{s}`: use one of {}", names.join(", "))
        })
    }
}

/// How the snippet authenticates, from the stream's rule (secrets themselves never appear).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Auth {
    None,
    Bearer,
    Hmac {
        header: String,
        prefix: String,
        base64: bool,
        timestamp_header: Option<String>,
    },
    /// Signed as the Standard Webhooks specification says (a sender's own backend can do it,
    /// as the SaaS products that follow it do).
    StandardWebhooks,
    /// A provider's own scheme that only the provider signs (Stripe).
    Provider(&'static str),
}

impl Auth {
    fn of(stream: &Stream) -> Self {
        match &stream.auth {
            None => Auth::None,
            Some(AuthSpec::Bearer { .. }) => Auth::Bearer,
            Some(AuthSpec::HmacSha256(h)) => Auth::Hmac {
                header: h.header.clone(),
                prefix: h.prefix.clone(),
                base64: h.encoding == SignatureEncoding::Base64,
                timestamp_header: h.timestamp_header.clone(),
            },
            // The providers' body-only schemes are our HMAC with their header and encoding, so
            // a test sender can stand in for the provider.
            Some(AuthSpec::GitHub { .. }) => Auth::Hmac {
                header: "X-Hub-Signature-256".into(),
                prefix: "sha256=".into(),
                base64: false,
                timestamp_header: None,
            },
            Some(AuthSpec::Shopify { .. }) => Auth::Hmac {
                header: "X-Shopify-Hmac-Sha256".into(),
                prefix: String::new(),
                base64: true,
                timestamp_header: None,
            },
            Some(AuthSpec::StandardWebhooks { .. }) => Auth::StandardWebhooks,
            Some(spec @ AuthSpec::Stripe { .. }) => Auth::Provider(spec.kind()),
        }
    }

    /// One line saying what the sender needs, for the snippet's header comment.
    fn note(&self) -> String {
        match self {
            Auth::None => "The stream has no auth: its URL is the secret; keep it private.".into(),
            Auth::Bearer => format!("Auth: bearer token, read from ${SECRET_ENV}."),
            Auth::Hmac {
                header,
                timestamp_header: Some(ts),
                ..
            } => format!(
                "Auth: HMAC-SHA256 of \"<timestamp>.<body>\" in {header}, Unix time in {ts}; signing secret from ${SECRET_ENV}."
            ),
            Auth::Hmac { header, .. } => format!(
                "Auth: HMAC-SHA256 of the body in {header}; signing secret from ${SECRET_ENV}."
            ),
            Auth::StandardWebhooks => format!(
                "Auth: Standard Webhooks signature (webhook-id, webhook-timestamp, webhook-signature); the whsec_ secret from ${SECRET_ENV}."
            ),
            Auth::Provider(kind) => format!("Auth: {kind} signs these requests."),
        }
    }

    /// The template's view of the rule: `kind` is none, bearer, hmac or standard-webhooks.
    fn context(&self) -> minijinja::Value {
        let (kind, header, prefix, base64, ts_header) = match self {
            Auth::None | Auth::Provider(_) => ("none", "", "", false, None),
            Auth::Bearer => ("bearer", "", "", false, None),
            Auth::Hmac {
                header,
                prefix,
                base64,
                timestamp_header,
            } => (
                "hmac",
                header.as_str(),
                prefix.as_str(),
                *base64,
                timestamp_header.as_deref(),
            ),
            Auth::StandardWebhooks => ("standard-webhooks", "", "", false, None),
        };
        context! { kind, header, prefix, base64, ts_header }
    }
}

/// The snippets' templates, one file per language in its own syntax (`ingest-gateway/snippets/`)
/// so editors and linters see real code; rendered with minijinja. Block tags take their whole
/// line (trim_blocks, lstrip_blocks) and an undefined name is an error, not an empty string.
fn templates() -> &'static Environment<'static> {
    static TEMPLATES: OnceLock<Environment<'static>> = OnceLock::new();
    TEMPLATES.get_or_init(|| {
        let mut env = Environment::new();
        match SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(true)
            .build()
        {
            Ok(syntax) => env.set_syntax(syntax),
            Err(error) => panic!("snippet template syntax: {error}"),
        }
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        for (name, source) in [
            ("curl.sh", include_str!("../snippets/curl.sh")),
            ("python.py", include_str!("../snippets/python.py")),
            ("node.mjs", include_str!("../snippets/node.mjs")),
            ("php.php", include_str!("../snippets/php.php")),
            ("ruby.rb", include_str!("../snippets/ruby.rb")),
            ("main.go", include_str!("../snippets/main.go")),
            (
                "SendWebhook.java",
                include_str!("../snippets/SendWebhook.java"),
            ),
            ("Program.cs", include_str!("../snippets/Program.cs")),
        ] {
            // Every template is rendered for every auth kind by the unit tests.
            if let Err(error) = env.add_template(name, source) {
                panic!("snippet template {name}: {error}");
            }
        }
        env
    })
}

impl Lang {
    /// The template this language renders (both Python flavours share one).
    fn template(self) -> &'static str {
        match self {
            Lang::Curl => "curl.sh",
            Lang::Python | Lang::PythonStdlib => "python.py",
            Lang::Node => "node.mjs",
            Lang::Php => "php.php",
            Lang::Ruby => "ruby.rb",
            Lang::Go => "main.go",
            Lang::Java => "SendWebhook.java",
            Lang::CSharp => "Program.cs",
        }
    }

    fn comment_marker(self) -> &'static str {
        match self {
            Lang::Curl | Lang::Python | Lang::PythonStdlib | Lang::Ruby => "# ",
            _ => "// ",
        }
    }
}

/// The snippet for `stream` in `lang`, sending to `base_url` (scheme, host and port of the
/// gateway as senders reach it, e.g. `https://hooks.example.com`).
pub fn snippet(lang: Lang, stream: &Stream, base_url: &str) -> String {
    let url = format!("{}/ds/{}", base_url.trim_end_matches('/'), stream.id);
    let auth = Auth::of(stream);
    let marker = lang.comment_marker();
    if let Auth::Provider(kind) = auth {
        let text = format!(
            "Data stream endpoint: {url}\nThis stream checks {kind} signatures: the sender signs with its own library or\nservers (see the README's section on {kind}); give it the URL above and the signing secret."
        );
        return text.lines().map(|l| format!("{marker}{l}\n")).collect();
    }
    let key_header = stream.idempotency_header().unwrap_or(DEFAULT_KEY_HEADER);
    let header = format!(
        "Sends one webhook to data stream {}, {}.\n{}\nRetries on 429/503 after Retry-After and on connection errors, with the same {key_header},\nso a retry is never a second row. Exits non-zero unless the gateway answered 2xx.",
        stream.id,
        lang.label(),
        auth.note()
    );
    let code = templates()
        .get_template(lang.template())
        .and_then(|template| {
            template.render(context! {
                url,
                body => EXAMPLE_BODY,
                key => EXAMPLE_KEY,
                key_header,
                secret_env => SECRET_ENV,
                requests => lang == Lang::Python,
                auth => auth.context(),
            })
        })
        .unwrap_or_else(|error| panic!("snippet template {}: {error:#}", lang.template()));
    let comment: String = header.lines().map(|l| format!("{marker}{l}\n")).collect();
    match lang {
        // A shebang must stay first.
        Lang::Curl => format!("#!/usr/bin/env bash\n{comment}{code}"),
        Lang::Php => format!("<?php\n{comment}{code}"),
        _ => format!("{comment}{code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookpipe_common::Catalogue;

    fn streams() -> Catalogue {
        Catalogue::from_yaml(
            "streams:
  - id: 522ed95e-9f07-45f6-a0b7-28bf2d0315e5
    table: p.d.open
    timezone: UTC
  - id: 9f1c2d3e-4b5a-4c6d-8e7f-0a1b2c3d4e5f
    table: p.d.bearer
    timezone: UTC
    auth: {type: bearer, secrets: [{env: T}]}
  - id: 0b7f3a52-9c1d-4e8a-b6f0-2d4c6e8a0b1c
    table: p.d.signed
    timezone: UTC
    auth: {type: hmac-sha256, header: X-Sig, prefix: 'sha256=', timestamp_header: X-Ts, secrets: [{env: S}]}
  - id: 5e6f7a8b-9c0d-4e1f-8a2b-3c4d5e6f7a8b
    table: p.d.signed64
    timezone: UTC
    auth: {type: hmac-sha256, encoding: base64, secrets: [{file: /s}]}
  - id: 1d2c3b4a-5e6f-4a7b-8c9d-0e1f2a3b4c5d
    table: p.d.standard
    timezone: UTC
    auth: {type: standard-webhooks, secrets: [{env: W}]}
  - id: 3f4e5d6c-7a8b-4c9d-8e1f-2a3b4c5d6e7f
    table: p.d.github
    timezone: UTC
    auth: {type: github, secrets: [{env: G}]}
  - id: 4a5f6e7d-8b9c-4d0e-9f2a-3b4c5d6e7f8a
    table: p.d.shopify
    timezone: UTC
    idempotency_header: X-Order-Change
    auth: {type: shopify, secrets: [{env: H}]}
",
        )
        .unwrap()
    }

    #[test]
    fn every_snippet_has_the_url_body_key_auth_and_retry_handling() {
        for stream in streams().streams() {
            for lang in Lang::ALL {
                let code = snippet(lang, stream, "https://hooks.example.com/");
                let what = format!("{lang} for {}", stream.table);
                assert!(
                    code.contains(&format!("https://hooks.example.com/ds/{}", stream.id)),
                    "{what}: url"
                );
                assert!(code.contains(EXAMPLE_BODY), "{what}: body");
                assert!(
                    !code.contains(&stream.table.to_string()),
                    "{what}: the table is internal"
                );
                assert!(code.contains(EXAMPLE_KEY), "{what}: key");
                let key_header = stream.idempotency_header().unwrap_or(DEFAULT_KEY_HEADER);
                assert!(code.contains(key_header), "{what}: key header {key_header}");
                assert!(
                    code.contains("application/x-www-form-urlencoded"),
                    "{what}: content type"
                );
                assert!(
                    code.contains("Retry-After") || lang == Lang::Curl,
                    "{what}: Retry-After"
                );
                assert!(code.contains("429") || lang == Lang::Curl, "{what}: 429");
                assert!(code.contains("503") || lang == Lang::Curl, "{what}: 503");
                match &stream.auth {
                    None => assert!(!code.contains(SECRET_ENV), "{what}: no secret needed"),
                    Some(AuthSpec::Bearer { .. }) => {
                        assert!(code.contains("Bearer "), "{what}: bearer");
                        assert!(code.contains(SECRET_ENV), "{what}: secret from env");
                    }
                    Some(AuthSpec::HmacSha256(h)) => {
                        assert!(code.contains(&h.header), "{what}: signature header");
                        assert!(code.contains(&h.prefix), "{what}: prefix");
                        if let Some(ts) = &h.timestamp_header {
                            assert!(code.contains(ts.as_str()), "{what}: timestamp header");
                        }
                        assert!(code.contains(SECRET_ENV), "{what}: secret from env");
                    }
                    Some(AuthSpec::StandardWebhooks { .. }) => {
                        assert_eq!(key_header, "webhook-id", "{what}");
                        for needle in ["webhook-timestamp", "webhook-signature", "whsec_", "v1,"] {
                            assert!(code.contains(needle), "{what}: {needle}");
                        }
                        assert!(code.contains(SECRET_ENV), "{what}: secret from env");
                    }
                    Some(AuthSpec::GitHub { .. }) => {
                        assert_eq!(key_header, "X-GitHub-Delivery", "{what}");
                        assert!(code.contains("X-Hub-Signature-256"), "{what}");
                        assert!(code.contains("sha256="), "{what}");
                    }
                    Some(AuthSpec::Shopify { .. }) => {
                        assert_eq!(key_header, "X-Order-Change", "{what}: the stream's own");
                        assert!(code.contains("X-Shopify-Hmac-Sha256"), "{what}");
                    }
                    Some(other) => panic!("{what}: no test catalogue stream is {}", other.kind()),
                }
            }
        }
    }

    #[test]
    fn a_stripe_stream_gets_where_to_point_stripe_not_code() {
        let catalogue = Catalogue::from_yaml(
            "streams:
  - id: 2e3d4c5b-6f7a-4b8c-9d0e-1f2a3b4c5d6e
    table: p.d.stripe
    timezone: UTC
    auth: {type: stripe, secrets: [{env: S}]}
",
        )
        .unwrap();
        let stream = catalogue.streams().next().unwrap();
        for lang in Lang::ALL {
            let text = snippet(lang, stream, "https://hooks.example.com");
            assert!(
                text.contains("https://hooks.example.com/ds/2e3d4c5b-6f7a-4b8c-9d0e-1f2a3b4c5d6e")
            );
            assert!(text.contains("stripe signatures"), "{text}");
            assert!(
                text.lines().all(|l| l.starts_with(lang.comment_marker())),
                "{text}"
            );
        }
    }

    #[test]
    fn curl_relies_on_curls_own_retry_which_honours_retry_after() {
        let stream = streams().streams().next().unwrap().clone();
        let code = snippet(Lang::Curl, &stream, "http://127.0.0.1:8080");
        assert!(code.starts_with("#!/usr/bin/env bash\n"));
        assert!(code.contains("--retry 5") && code.contains("--fail-with-body"));
    }

    #[test]
    fn languages_parse_by_name_and_common_aliases() {
        for lang in Lang::ALL {
            assert_eq!(lang.name().parse::<Lang>().unwrap(), lang);
        }
        assert_eq!("C#".parse::<Lang>().unwrap(), Lang::CSharp);
        assert_eq!("nodejs".parse::<Lang>().unwrap(), Lang::Node);
        assert!(
            "cobol"
                .parse::<Lang>()
                .unwrap_err()
                .contains("python-stdlib")
        );
    }
}
