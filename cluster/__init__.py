"""Where jobs run: the `fulcrum` command, the embedded local Ray, (later) Ray Jobs and KubeRay."""
