"""HTTP layer: routers, schemas, dependencies and the problem+json translation."""
