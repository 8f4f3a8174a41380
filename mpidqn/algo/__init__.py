"""DQN mathematics without communication: TD targets, losses, target updates, schedules."""
