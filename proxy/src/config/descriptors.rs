//! Envoy's v3 API as a protobuf descriptor pool.
//!
//! `config/descriptors/envoy.binpb` is compiled from the `.proto` files that the `envoy-types` crate ships, by
//! the generator beside it (`config/descriptors/README.md`). Decoding it takes a few milliseconds, once.

use prost_reflect::{DescriptorPool, MessageDescriptor};
use std::sync::OnceLock;

static BYTES: &[u8] = include_bytes!("../../../config/descriptors/envoy.binpb");

/// The pool, decoded on first use.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| match DescriptorPool::decode(BYTES) {
        Ok(p) => p,
        // The bytes are compiled in and checked by a unit test; a failure here is a broken build.
        Err(e) => panic!("the embedded Envoy descriptor set does not decode: {e}"),
    })
}

/// The descriptor of a message by full name (`envoy.config.bootstrap.v3.Bootstrap`).
pub fn message(full_name: &str) -> Option<MessageDescriptor> {
    pool().get_message_by_name(full_name)
}

/// The message a `type.googleapis.com/...` URL names.
pub fn message_for_type_url(url: &str) -> Option<MessageDescriptor> {
    let name = url.rsplit_once('/').map_or(url, |(_, n)| n);
    message(name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn pool_has_the_messages_remora_reads() {
        for name in [
            "envoy.config.bootstrap.v3.Bootstrap",
            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "envoy.extensions.filters.http.router.v3.Router",
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
            "envoy.service.discovery.v3.DiscoveryRequest",
        ] {
            assert!(super::message(name).is_some(), "{name}");
        }
    }
}
