"""Running a job elsewhere: the Ray Jobs API (submit), KubeRay manifests (k8s_render, pure) and creating them
(k8s_apply), with the checks of what reaches the cluster (portability)."""
