"""The repository contract shared by the server and the exporters: layout, config, publishing."""
