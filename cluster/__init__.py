"""The `hybrid-serve` command line, local cluster start-up, `doctor`, and the KubeRay manifests
rendered from the configuration."""
