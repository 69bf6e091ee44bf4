"""tunesec.cli."""
