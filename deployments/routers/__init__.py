"""The HTTP routes, a router per resource; each reaches the shared `Ingress` as a dependency."""
