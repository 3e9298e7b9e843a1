"""A study on a Ray cluster: trial shapes, what the cluster can become, node checks, placement, the
cluster-launcher file."""
