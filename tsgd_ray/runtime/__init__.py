"""How Ray runs the stages: cluster start-up, the elastic actor pool, the Ray Train glue."""
