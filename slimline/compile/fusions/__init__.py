"""slimline's own graph rewrites, one module per rule, each with a sketch of what it matches."""
