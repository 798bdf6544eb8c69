"""What a pod gets on the host: sizing, mounts, network wiring, cgroups."""
