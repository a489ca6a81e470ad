"""Every Redis script of the engine, one file each, shipped as package data."""
