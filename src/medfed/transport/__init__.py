"""Transports carry round plans to sites and updates back. Simulation is just a transport."""
