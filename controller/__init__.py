"""Adaptive budget controller: picks a ReductionPlan per request. Imports the engine's plan/FLOPs types and
nothing from `service`; the decision itself (`policy.decide`) is a pure function."""
