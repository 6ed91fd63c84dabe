//! Envoy's v3 API as a protobuf descriptor pool.
//!
//! `config/descriptors/envoy.binpb` is compiled from the `.proto` files that the `envoy-types` crate ships, by
//! the generator beside it (`config/descriptors/README.md`). Decoding it takes a few milliseconds, once.

use prost_reflect::{DescriptorPool, MessageDescriptor};
use std::sync::Mutex;

static BYTES: &[u8] = include_bytes!("../../../config/descriptors/envoy.binpb");

/// The decoded pool while it is in use; see [`release`].
static POOL: Mutex<Option<DescriptorPool>> = Mutex::new(None);

/// The pool, decoded on first use (a handle: clones share it).
pub fn pool() -> DescriptorPool {
    let mut pool = POOL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    pool.get_or_insert_with(|| match DescriptorPool::decode(BYTES) {
        Ok(p) => p,
        // The bytes are compiled in and checked by a unit test; a failure here is a broken build.
        Err(e) => panic!("the embedded Envoy descriptor set does not decode: {e}"),
    })
    .clone()
}

/// Let the decoded pool go (several MiB): its memory is freed once no descriptor or message of it is left, and
/// the next use decodes it again. Called once the bootstrap is loaded: a static configuration needs no
/// descriptor after that, and a dynamic one decodes the pool again with its first resource.
pub fn release() {
    POOL.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
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

    #[test]
    fn released_pool_decodes_again() {
        let before = super::message("envoy.config.bootstrap.v3.Bootstrap");
        super::release();
        let after = super::message("envoy.config.bootstrap.v3.Bootstrap");
        assert!(before.is_some());
        assert_eq!(
            before.map(|d| d.full_name().to_string()),
            after.map(|d| d.full_name().to_string())
        );
    }
}
