"""The annotations by which containerd's CRI plugin and CRI-O say what a container is to its pod: the
pod's sandbox (pause) container or one of its containers, and which sandbox it belongs to."""

CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
CRIO_CONTAINER_TYPE = "io.kubernetes.cri-o.ContainerType"
CRIO_SANDBOX_ID = "io.kubernetes.cri-o.SandboxID"
SANDBOX_TYPE = "sandbox"  # the value of both container-type annotations for a pod's sandbox container
