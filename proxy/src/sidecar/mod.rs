//! Onboarding a service onto the sidecar: `remora template` (a bootstrap from a service manifest) and
//! `remora inject` (the sidecar added to Kubernetes Deployments, and the canary rollout).

pub mod inject;
pub mod template;
