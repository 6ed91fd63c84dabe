//! RTDS over REST (`api_type: REST`): every `refresh_delay` a JSON `DiscoveryRequest` naming the layers'
//! resources is POSTed to `/v3/discovery:runtime` on a host of `cluster_names[0]` (over TLS when the cluster
//! has a TLS transport socket), with [`crate::xds::rest`]'s request and exchange (same
//! timeouts, 304 for unchanged, the last accepted `version_info` and a rejected update's `error_detail` on the
//! next request). Unlike CDS and LDS, RTDS is not a wildcard type: the request
//! carries `resource_names`.

use super::RUNTIME_TYPE;
use crate::config::error::ConfigErrors;
use crate::server::Shared;
use crate::xds::rest::RestConfig;
use crate::xds::{decode_resources, Source};
use prost_reflect::DynamicMessage;
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

/// One poll: `Ok(None)` for 304, the parsed response for 200 (the request and the exchange are xDS's REST
/// polling's own, for the `Runtime` type and the layers' names).
async fn poll(
    shared: &Shared,
    cfg: &RestConfig,
    names: &[String],
    version: &str,
    rejected: Option<&ConfigErrors>,
    attempt: usize,
) -> Result<Option<Result<DynamicMessage, ConfigErrors>>, String> {
    let body = crate::xds::rest::request_body(shared, RUNTIME_TYPE, version, names, rejected)?;
    match crate::xds::rest::poll(shared, cfg, "/v3/discovery:runtime", body, attempt).await? {
        crate::xds::rest::Poll::Unchanged => Ok(None),
        crate::xds::rest::Poll::Response(r) => Ok(Some(r)),
    }
}
