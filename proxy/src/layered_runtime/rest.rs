//! RTDS over REST (`api_type: REST`): every `refresh_delay` a JSON `DiscoveryRequest` naming the layers'
//! resources is POSTed to `/v3/discovery:runtime` on a host of `cluster_names[0]` (over TLS when the cluster
//! has a TLS transport socket), as [`crate::xds::rest`] does for CDS and LDS (same timeouts, 304 for unchanged, the last accepted `version_info` and a rejected
//! update's `error_detail` on the next request). Unlike CDS and LDS, RTDS is not a wildcard type: the request
//! carries `resource_names`.

use super::RUNTIME_TYPE;
use crate::config::descriptors;
use crate::config::error::ConfigErrors;
use crate::config::load::{self, Format};
use crate::server::Shared;
use crate::xds::rest::RestConfig;
use crate::xds::{decode_resources, Source};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prost_reflect::{DynamicMessage, SerializeOptions, Value};
use std::sync::Arc;

/// Poll for as long as the process lives. The first poll, whatever its outcome, ends the initial fetch.
pub async fn run(shared: Arc<Shared>, cfg: RestConfig) {
    let names = shared
        .runtime
        .rtds_names(|s| matches!(s, Source::Rest(r) if *r == cfg));
    let mut version = String::new();
    let mut rejected: Option<ConfigErrors> = None;
    let mut attempt = 0usize;
    let mut first = true;
    loop {
        let rt = &shared.runtime;
        match poll(&shared, &cfg, &names, &version, rejected.as_ref(), attempt).await {
            Ok(None) => {}
            Ok(Some(parsed)) => {
                let v = parsed
                    .as_ref()
                    .ok()
                    .and_then(|r| r.get_field_by_name("version_info"))
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let result = match parsed.and_then(|resp| decode_resources(&resp, RUNTIME_TYPE)) {
                    Ok(resources) => rt.apply_rtds(&resources, &[]),
                    Err(e) => {
                        rt.rtds_stats.update_attempt.inc();
                        rt.rtds_stats.update_rejected.inc();
                        Err(e)
                    }
                };
                match result {
                    Ok(()) => {
                        version = v;
                        rejected = None;
                    }
                    Err(e) => {
                        tracing::warn!(rejected = %v, errors = %e, "RTDS REST: rejected");
                        rejected = Some(e);
                    }
                }
            }
            Err(e) => {
                rt.rtds_stats.update_attempt.inc();
                rt.rtds_stats.update_failure.inc();
                tracing::warn!(error = %e, "RTDS REST: poll failed; keeping the last good runtime");
            }
        }
        attempt += 1;
        if first {
            first = false;
            rt.rtds_initial_done(&names);
            shared.dynamic.notify();
        }
        tokio::time::sleep(cfg.refresh_delay).await;
    }
}

fn request_body(
    shared: &Shared,
    names: &[String],
    version: &str,
    rejected: Option<&ConfigErrors>,
) -> Result<Vec<u8>, String> {
    let desc = descriptors::message("envoy.service.discovery.v3.DiscoveryRequest")
        .ok_or("no descriptor for DiscoveryRequest")?;
    let mut m = DynamicMessage::new(desc);
    m.set_field_by_name("version_info", Value::String(version.to_string()));
    m.set_field_by_name("type_url", Value::String(RUNTIME_TYPE.to_string()));
    m.set_field_by_name(
        "resource_names",
        Value::List(names.iter().map(|n| Value::String(n.clone())).collect()),
    );
    if let Some(n) = crate::xds::ads::node(shared) {
        m.set_field_by_name("node", Value::Message(n));
    }
    if let Some(e) = rejected {
        let detail = crate::xds::ads::error_detail(e).map_err(|s| s.message().to_string())?;
        m.set_field_by_name("error_detail", Value::Message(detail));
    }
    let mut ser = serde_json::Serializer::new(Vec::new());
    m.serialize_with_options(&mut ser, &SerializeOptions::new().use_proto_field_name(true))
        .map_err(|e| e.to_string())?;
    Ok(ser.into_inner())
}

/// One poll: `Ok(None)` for 304, the parsed response for 200.
async fn poll(
    shared: &Shared,
    cfg: &RestConfig,
    names: &[String],
    version: &str,
    rejected: Option<&ConfigErrors>,
    attempt: usize,
) -> Result<Option<Result<DynamicMessage, ConfigErrors>>, String> {
    let (cluster, host) = crate::xds::dial::pick(shared, &cfg.cluster_name, attempt)?;
    let addr = host.address;
    let body = request_body(shared, names, version, rejected)?;
    let exchange = async {
        // TCP, then TLS when the cluster has a TLS transport socket.
        let stream = crate::xds::dial::connect(&cluster, &host).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::post("/v3/discovery:runtime")
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| format!("{addr}: {e}"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{addr}: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(cfg.request_timeout, exchange)
        .await
        .map_err(|_| format!("no answer from {addr} within {:?}", cfg.request_timeout))??;
    match status.as_u16() {
        304 => Ok(None),
        200 => {
            let desc = descriptors::message("envoy.service.discovery.v3.DiscoveryResponse")
                .ok_or("no descriptor for DiscoveryResponse")?;
            let text = String::from_utf8_lossy(&bytes);
            Ok(Some(load::message_from_text(&text, Format::Json, &desc)))
        }
        other => Err(format!("{addr} answered {other}")),
    }
}
