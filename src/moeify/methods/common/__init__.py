"""What two or more methods share; no method imports another method."""

from .clustering import activation_rates, balanced_assignment, balanced_kmeans, cluster_rows, order_desc, seeded_init
from .experts import EqualExpertsConfig, LayoutConfig, check_experts_fit, resolve_active
from .routing import analytical_router_for, centroid_router_for, expert_mass, finish_plan, mlp_router_for, topk_mask, train_mlp_router

__all__ = ["EqualExpertsConfig", "LayoutConfig", "activation_rates", "analytical_router_for", "balanced_assignment", "balanced_kmeans",
           "centroid_router_for", "check_experts_fit", "cluster_rows", "expert_mass", "finish_plan", "mlp_router_for", "order_desc",
           "resolve_active", "seeded_init", "topk_mask", "train_mlp_router"]
