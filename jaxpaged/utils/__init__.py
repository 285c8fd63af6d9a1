"""Small host-side helpers shared by several packages."""
