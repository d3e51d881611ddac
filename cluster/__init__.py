"""The operator's face and shared infrastructure: CLI, local cluster, artifact store, configs."""
