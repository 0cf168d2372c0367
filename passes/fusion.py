"""Fusions of adjacent nodes into one."""
