"""Ray Serve deployments: thin wrappers that put engines and agents behind handles and HTTP."""
