"""The tools around the library: the CLI, the audits, image builds and Kubernetes manifests."""
