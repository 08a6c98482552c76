"""How a decoded request reaches its backend: every scheduler implements `base.Scheduler`."""
