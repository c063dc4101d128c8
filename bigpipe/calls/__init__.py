"""What happens to a call after it is accepted, seen from outside: signed deliveries."""
