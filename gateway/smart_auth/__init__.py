"""SMART App Launch 2.x authorization server (Authlib): see server.py for the grants."""
