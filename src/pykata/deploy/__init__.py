"""Deploying pykata on Kubernetes nodes (kata-deploy's job): the node payload, the node installer
(`pykata install node`), and the installer's container image (an OCI layout)."""
