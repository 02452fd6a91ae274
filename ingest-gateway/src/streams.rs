//! Data stream management: `ingest-gateway streams new|validate|list|snippet` from the command
//! line, and the admin port's `GET /streams` and `GET /streams/{id}/snippet`. The catalogue
//! file stays the source of truth (a ConfigMap in Kubernetes); these commands write entries
//! for it, check it with the services' own validation, and show senders what to paste.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hookpipe_common::Catalogue;
use hookpipe_common::catalogue::{AuthSpec, Shared, Stream};
use uuid::Uuid;

use crate::http::GatewayStreams;
use crate::snippets::{Lang, snippet};

/// `ingest-gateway streams ...`
#[derive(clap::Subcommand, Clone, Debug)]
pub enum StreamsCommand {
    /// Print a new catalogue entry with a fresh UUID, ready to append under `streams:`.
    New(NewArgs),
    /// Check a catalogue file with the same validation the services run.
    Validate {
        file: PathBuf,
        /// Also read every secret, as the gateway does at start-up (the variables or files must
        /// be there).
        #[arg(long)]
        resolve_secrets: bool,
    },
    /// List the streams of a catalogue file: id, table, zone, auth mode, endpoint URL.
    List {
        file: PathBuf,
        /// The gateway's address as senders reach it.
        #[arg(
            long,
            env = "HOOKPIPE_PUBLIC_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        base_url: String,
    },
    /// Print the integration snippet for a stream.
    Snippet {
        id: Uuid,
        /// curl, python, python-stdlib, node, php, ruby, go, java or csharp.
        #[arg(long)]
        lang: Lang,
        /// The gateway's address as senders reach it.
        #[arg(
            long,
            env = "HOOKPIPE_PUBLIC_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        base_url: String,
        /// The catalogue holding the stream.
        #[arg(long, env = "HOOKPIPE_CATALOGUE")]
        catalogue: PathBuf,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthKind {
    None,
    Bearer,
    Hmac,
    /// A sender following the Standard Webhooks specification (Svix and others).
    StandardWebhooks,
    Stripe,
    Github,
    Shopify,
}

#[derive(clap::Args, Clone, Debug)]
pub struct NewArgs {
    /// Destination table, `project.dataset.table` (created by the sink if missing).
    #[arg(long)]
    pub table: String,
    /// The zone the `date` column is computed in: `+03:00`, `UTC`, `Europe/Berlin`, ...
    #[arg(long)]
    pub timezone: String,
    /// A label for people; not used by the pipeline.
    #[arg(long)]
    pub name: Option<String>,
    /// How senders authenticate.
    #[arg(long, value_enum, default_value = "none")]
    pub auth: AuthKind,
    /// Environment variable the gateway reads the token or signing secret from.
    #[arg(long, conflicts_with = "secret_file")]
    pub secret_env: Option<String>,
    /// File the gateway reads the token or signing secret from (a mounted Secret).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// For `hmac`: sign without a timestamp (replayable; only for senders that cannot send one).
    #[arg(long)]
    pub no_timestamp: bool,
}

/// Runs a `streams` command, writing to stdout; `Err` is the message for stderr (exit 1).
pub fn run(command: &StreamsCommand, out: &mut String) -> Result<(), String> {
    match command {
        StreamsCommand::New(args) => {
            out.push_str(&new_entry(args, Uuid::new_v4())?);
            Ok(())
        }
        StreamsCommand::Validate {
            file,
            resolve_secrets,
        } => {
            let catalogue =
                Catalogue::load(file).map_err(|e| format!("{}: {e}", file.display()))?;
            if *resolve_secrets {
                GatewayStreams::build(catalogue.clone())
                    .map_err(|e| format!("{}: {e}", file.display()))?;
            }
            let _ = writeln!(
                out,
                "{}: {} stream(s), valid{}",
                file.display(),
                catalogue.len(),
                if *resolve_secrets {
                    ", every secret readable"
                } else {
                    ""
                }
            );
            Ok(())
        }
        StreamsCommand::List { file, base_url } => {
            let catalogue =
                Catalogue::load(file).map_err(|e| format!("{}: {e}", file.display()))?;
            out.push_str(&list(&catalogue, base_url));
            Ok(())
        }
        StreamsCommand::Snippet {
            id,
            lang,
            base_url,
            catalogue,
        } => {
            let loaded =
                Catalogue::load(catalogue).map_err(|e| format!("{}: {e}", catalogue.display()))?;
            let stream = loaded
                .get(id)
                .ok_or_else(|| format!("stream {id} is not in {}", catalogue.display()))?;
            out.push_str(&snippet(*lang, stream, base_url));
            Ok(())
        }
    }
}

/// A catalogue entry for a new stream, checked by parsing it as the services would.
pub fn new_entry(args: &NewArgs, id: Uuid) -> Result<String, String> {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut entry = format!("  - id: {id}\n");
    if let Some(name) = &args.name {
        let _ = writeln!(entry, "    name: {}", q(name));
    }
    let _ = writeln!(entry, "    table: {}", q(&args.table));
    let _ = writeln!(entry, "    timezone: {}", q(&args.timezone));
    let secret = match (&args.secret_env, &args.secret_file) {
        (_, Some(file)) => format!("{{file: {}}}", q(&file.display().to_string())),
        (Some(env), None) => format!("{{env: {}}}", q(env)),
        (None, None) => {
            let short = id.simple().to_string()[..8].to_ascii_uppercase();
            format!("{{env: \"STREAM_{short}_SECRET\"}}")
        }
    };
    match args.auth {
        AuthKind::None => {}
        AuthKind::Bearer => {
            let _ = write!(
                entry,
                "    auth:\n      type: bearer\n      secrets: [{secret}]\n"
            );
        }
        AuthKind::Hmac => {
            let _ = write!(
                entry,
                "    auth:\n      type: hmac-sha256\n      header: X-Signature\n      prefix: \"sha256=\"\n"
            );
            if !args.no_timestamp {
                let _ = writeln!(entry, "      timestamp_header: X-Timestamp");
            }
            let _ = writeln!(entry, "      secrets: [{secret}]");
        }
        provider => {
            let kind = match provider {
                AuthKind::StandardWebhooks => "standard-webhooks",
                AuthKind::Stripe => "stripe",
                AuthKind::Github => "github",
                _ => "shopify",
            };
            let _ = write!(
                entry,
                "    auth:\n      type: {kind}\n      secrets: [{secret}]\n"
            );
        }
    }
    if args.auth == AuthKind::None && (args.secret_env.is_some() || args.secret_file.is_some()) {
        return Err("--secret-env/--secret-file need an --auth other than none".into());
    }
    Catalogue::from_yaml(&format!("streams:\n{entry}")).map_err(|e| e.to_string())?;
    Ok(entry)
}

fn auth_mode(stream: &Stream) -> &'static str {
    stream.auth.as_ref().map_or("none", AuthSpec::kind)
}

fn endpoint(base_url: &str, stream: &Stream) -> String {
    format!("{}/ds/{}", base_url.trim_end_matches('/'), stream.id)
}

/// The `streams list` table.
pub fn list(catalogue: &Catalogue, base_url: &str) -> String {
    let rows: Vec<[String; 5]> = catalogue
        .streams()
        .map(|s| {
            [
                s.id.to_string(),
                s.table.to_string(),
                s.zone.to_string(),
                auth_mode(s).to_owned(),
                endpoint(base_url, s),
            ]
        })
        .collect();
    let titles = ["ID", "TABLE", "ZONE", "AUTH", "URL"].map(str::to_owned);
    let widths: Vec<usize> = (0..5)
        .map(|i| {
            rows.iter()
                .chain([&titles])
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in [&titles].into_iter().chain(rows.iter()) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// What the admin routes need.
#[derive(Clone)]
pub struct AdminStreams {
    pub streams: Arc<Shared<GatewayStreams>>,
    /// The gateway's address as senders reach it (`HOOKPIPE_PUBLIC_URL`).
    pub public_url: String,
}

#[derive(serde::Deserialize)]
struct SnippetQuery {
    lang: Option<String>,
    base_url: Option<String>,
}

/// `GET /streams` (JSON, no secrets: only the auth mode) and
/// `GET /streams/{id}/snippet?lang=...[&base_url=...]` (text).
pub fn admin_routes(state: AdminStreams) -> Router {
    Router::new()
        .route("/streams", get(list_json))
        .route("/streams/{id}/snippet", get(snippet_text))
        .with_state(state)
}

async fn list_json(State(state): State<AdminStreams>) -> Response {
    let current = state.streams.current();
    let streams: Vec<serde_json::Value> = current
        .catalogue
        .streams()
        .map(|s| {
            serde_json::json!({
                "id": s.id,
                "name": s.name,
                "table": s.table.to_string(),
                "timezone": s.zone.to_string(),
                "auth": auth_mode(s),
                "url": endpoint(&state.public_url, s),
            })
        })
        .collect();
    axum::Json(serde_json::json!({ "streams": streams })).into_response()
}

fn json_error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

async fn snippet_text(
    State(state): State<AdminStreams>,
    Path(id): Path<String>,
    Query(query): Query<SnippetQuery>,
) -> Response {
    let Some(lang) = query.lang else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "missing ?lang= (curl, python, python-stdlib, node, php, ruby, go, java, csharp)"
                .into(),
        );
    };
    let lang = match lang.parse::<Lang>() {
        Ok(lang) => lang,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, e),
    };
    let current = state.streams.current();
    let Some(stream) = Uuid::try_parse(&id)
        .ok()
        .and_then(|id| current.catalogue.get(&id))
    else {
        return json_error(StatusCode::NOT_FOUND, "unknown stream".into());
    };
    let base = query.base_url.as_deref().unwrap_or(&state.public_url);
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("inline; filename=\"{}\"", lang.file_name()),
            ),
        ],
        snippet(lang, stream, base),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(auth: AuthKind) -> NewArgs {
        NewArgs {
            table: "my-project.offline_data.crm_orders".into(),
            timezone: "+03:00".into(),
            name: Some("CRM \"orders\"".into()),
            auth,
            secret_env: None,
            secret_file: None,
            no_timestamp: false,
        }
    }

    #[test]
    fn a_new_entry_is_a_valid_catalogue_entry_for_every_auth_mode() {
        let id = Uuid::new_v4();
        for auth in [AuthKind::None, AuthKind::Bearer, AuthKind::Hmac] {
            let entry = new_entry(&args(auth), id).unwrap();
            let catalogue = Catalogue::from_yaml(&format!("streams:\n{entry}")).unwrap();
            let stream = catalogue.get(&id).unwrap();
            assert_eq!(
                stream.table.to_string(),
                "my-project.offline_data.crm_orders"
            );
            assert_eq!(stream.name.as_deref(), Some("CRM \"orders\""));
            assert_eq!(
                auth_mode(stream),
                ["none", "bearer", "hmac-sha256"][auth as usize]
            );
        }
        let hmac = new_entry(&args(AuthKind::Hmac), id).unwrap();
        assert!(hmac.contains("timestamp_header: X-Timestamp"), "{hmac}");
    }

    #[test]
    fn a_bad_table_or_zone_is_refused_with_the_services_message() {
        let mut bad = args(AuthKind::None);
        bad.timezone = "Mars/Olympus".into();
        assert!(
            new_entry(&bad, Uuid::new_v4())
                .unwrap_err()
                .contains("timezone")
        );
        let mut bad = args(AuthKind::None);
        bad.table = "no_dots".into();
        assert!(
            new_entry(&bad, Uuid::new_v4())
                .unwrap_err()
                .contains("table")
        );
        let mut bad = args(AuthKind::None);
        bad.secret_env = Some("X".into());
        assert!(new_entry(&bad, Uuid::new_v4()).is_err());
    }

    #[test]
    fn list_shows_id_table_zone_auth_and_url() {
        let catalogue = Catalogue::from_yaml(
            "streams:\n  - id: 522ed95e-9f07-45f6-a0b7-28bf2d0315e5\n    table: p.d.t\n    timezone: Europe/Berlin\n    auth: {type: bearer, secrets: [{env: T}]}\n",
        )
        .unwrap();
        let text = list(&catalogue, "https://hooks.example.com/");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID") && lines[0].contains("URL"));
        assert!(lines[1].contains("522ed95e-9f07-45f6-a0b7-28bf2d0315e5"));
        assert!(lines[1].contains("p.d.t") && lines[1].contains("Europe/Berlin"));
        assert!(lines[1].contains("bearer"));
        assert!(
            lines[1].ends_with("https://hooks.example.com/ds/522ed95e-9f07-45f6-a0b7-28bf2d0315e5")
        );
    }
}
