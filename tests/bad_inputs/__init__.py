"""A catalogue of bad inputs to every pass and public entry point, one table per area.

Each case says what is called, the :class:`surgery.errors.SurgeryError` subclass it must
raise, and what the message must say (the pass or function, the bad value, a way out);
every case also checks that the model given is unchanged and that no file was left behind.
"""
