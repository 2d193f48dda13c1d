//! The planner: given a model config, a cluster, a weight format and a context length, where
//! attention and experts go, what each GPU holds, what each layer moves, and how fast prefill
//! and decode should be (a roofline over compute, memory and links).

pub mod counts;
pub mod placement;
pub mod plan;
pub mod profiles;

pub use counts::ModelCounts;
pub use plan::{
    ContextCost, Plan, PlanRequest, WeightFormat, context_degree, plan, plan_with_degree,
    smallest_degree,
};
pub use profiles::{GpuProfile, gpu, text01};
