//! Google credentials, made once and shared by both BigQuery clients: the REST client (tables,
//! lookups, insertAll) and the Storage Write API's gRPC channel, so both act as the same
//! principal whatever the source (a key file, application-default credentials, the GKE
//! metadata server for workload identity).

use std::sync::Arc;

use async_trait::async_trait;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::error::BQError;
use gcp_bigquery_client::yup_oauth2;

use crate::config::BigQueryArgs;

/// BigQuery's OAuth scope (reads, writes, jobs).
pub const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";

type Connector =
    <yup_oauth2::DefaultHyperClientBuilder as yup_oauth2::HyperClientBuilder>::Connector;

/// A yup-oauth2 authenticator (which caches and refreshes tokens) for BigQuery's scope.
#[derive(Clone)]
pub struct GoogleAuth {
    auth: yup_oauth2::authenticator::Authenticator<Connector>,
}

#[async_trait]
impl Authenticator for GoogleAuth {
    async fn access_token(&self) -> Result<String, BQError> {
        let token = self.auth.token(&[SCOPE]).await?;
        token.token().map(str::to_owned).ok_or(BQError::NoToken)
    }
}

/// No credentials: for the local emulator only. The token is empty and no `authorization`
/// header is sent.
#[derive(Clone)]
pub struct NoAuth;

#[async_trait]
impl Authenticator for NoAuth {
    async fn access_token(&self) -> Result<String, BQError> {
        Ok(String::new())
    }
}

/// The credentials `args` name.
pub async fn credentials(args: &BigQueryArgs) -> Result<Arc<dyn Authenticator>, BQError> {
    let auth = match args.auth.as_str() {
        "none" => return Ok(Arc::new(NoAuth)),
        "service-account" => {
            let path = args.key_file.clone().unwrap_or_default();
            let key = yup_oauth2::read_service_account_key(&path)
                .await
                .map_err(BQError::InvalidServiceAccountKey)?;
            yup_oauth2::ServiceAccountAuthenticator::builder(key)
                .build()
                .await
                .map_err(BQError::InvalidServiceAccountAuthenticator)?
        }
        // Workload identity on GKE is the metadata server, which application-default
        // credentials use when no key file is named.
        _ => {
            let opts = yup_oauth2::ApplicationDefaultCredentialsFlowOpts::default();
            match yup_oauth2::ApplicationDefaultCredentialsAuthenticator::builder(opts).await {
                yup_oauth2::authenticator::ApplicationDefaultCredentialsTypes::ServiceAccount(
                    builder,
                ) => builder.build().await,
                yup_oauth2::authenticator::ApplicationDefaultCredentialsTypes::InstanceMetadata(
                    builder,
                ) => builder.build().await,
            }
            .map_err(BQError::InvalidApplicationDefaultCredentialsAuthenticator)?
        }
    };
    Ok(Arc::new(GoogleAuth { auth }))
}
