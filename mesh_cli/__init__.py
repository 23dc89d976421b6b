"""asya-mesh: a command-line client for the mesh API's external port (see docs/cli.md)."""
