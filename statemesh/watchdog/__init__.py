"""The terminal watchdog (statemesh-watchdog.service): ends every new terminal session.

daemon runs the event loop; terminals finds who holds which terminal in /proc; inotify
watches devpts and the terminal devices; handover lets a new daemon take over without a
window. The guarantee that the unit runs lives in statemesh.guarantees.watchdog.
"""
