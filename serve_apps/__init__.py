"""Online serving: the inference engine, Ray Serve deployments, the OpenAI ingress, the router."""
