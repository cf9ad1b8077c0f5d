"""The whole lifecycle in one command: `cpmctl run recipes/lifecycle/mini.yaml`."""
