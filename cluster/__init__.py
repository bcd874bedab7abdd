"""Where jobs run: the `fulcrum` command, the embedded local Ray, Ray Jobs submission and KubeRay."""
