//! How client subcommands reach a server: `--server` (host:port or an http(s):// URL), a bearer
//! token, and TLS (a CA to trust, optionally a client certificate for mutual TLS).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Request,
};

use crate::secret::Secret;

/// Where client subcommands connect when --server / LMX_SERVER is not given.
pub const DEFAULT_SERVER: &str = "127.0.0.1:50051";

/// Connection flags shared by the client subcommands.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The lmx server: host:port, or an http:// or https:// URL [default: 127.0.0.1:50051].
    #[arg(long, env = "LMX_SERVER")]
    pub server: Option<String>,

    /// Bearer token sent with every call (the admin or inference token). Never printed.
    #[arg(long, env = "LMX_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,

    /// CA certificate (PEM) to trust for TLS; implies https.
    #[arg(long, env = "LMX_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, env = "LMX_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,

    /// Client private key (PEM) for mutual TLS.
    #[arg(long, env = "LMX_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,

    /// Server name to verify in the server's certificate (default: the host of --server).
    #[arg(long, env = "LMX_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

/// A connected client.
#[derive(Clone)]
pub struct Client {
    pub channel: Channel,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl ClientArgs {
    fn url(&self) -> String {
        let server = self.server.as_deref().unwrap_or(DEFAULT_SERVER);
        let tls = self.tls_ca.is_some() || self.tls_client_cert.is_some();
        if server.starts_with("http://") || server.starts_with("https://") {
            server.to_owned()
        } else if tls {
            format!("https://{server}")
        } else {
            format!("http://{server}")
        }
    }

    /// Connects (lazily: the first call reports an unreachable server).
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let url = self.url();
        let mut endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("--server {url:?} is not a valid address"))?;
        if url.starts_with("https://") {
            // Public CAs by default; --tls-ca adds a private one.
            let mut tls = ClientTlsConfig::new().with_webpki_roots();
            if let Some(ca) = &self.tls_ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("reading --tls-ca {}", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&self.tls_client_cert, &self.tls_client_key) {
                let cert = std::fs::read(cert)
                    .with_context(|| format!("reading --tls-client-cert {}", cert.display()))?;
                let key = std::fs::read(key)
                    .with_context(|| format!("reading --tls-client-key {}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &self.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(tls).context("configuring TLS")?;
        }
        let channel = endpoint.connect_lazy();
        let token = match &self.token {
            Some(t) => Some(
                format!("Bearer {}", t.expose())
                    .parse()
                    .context("the token is not a valid header value")?,
            ),
            None => None,
        };
        Ok(Client { channel, token })
    }
}

impl Client {
    /// Wraps a message, adding the token.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }

    pub fn admin(&self) -> crate::pb::model_admin_client::ModelAdminClient<Channel> {
        crate::pb::model_admin_client::ModelAdminClient::new(self.channel.clone())
    }

    pub fn inference(&self) -> crate::pb::inference_client::InferenceClient<Channel> {
        crate::pb::inference_client::InferenceClient::new(self.channel.clone())
    }
}

/// "NOT_FOUND (MODEL_NOT_FOUND): message" for a failed call.
pub fn describe(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let code = format!("{:?}", status.code());
    match status.get_details_error_info() {
        Some(info) => format!("{code} ({}): {}", info.reason, status.message()),
        None => format!("{code}: {}", status.message()),
    }
}
