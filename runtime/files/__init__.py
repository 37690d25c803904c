"""Files in and out of an encoding run, and what keeps them whole: input readers, output writers, atomic
publication, locks, and the shards and state that let a killed run resume byte-identical."""
