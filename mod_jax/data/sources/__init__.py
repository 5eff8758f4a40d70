"""Data sources: a folder of videos + narrations.json, and the procedural dataset written as one."""
