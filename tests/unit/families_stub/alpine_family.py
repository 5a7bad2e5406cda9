"""A stub image family, as a user adding one would write it: this module and catalogue entries are all."""

from image_factory.families import Family, register

ALPINE = register(Family(
    name="alpine",
    package_query=("apk info -v | sed -E "
                   "'s/^(.*)-([^-]+-r[0-9]+)$/installed\\t\\1\\t\\2\\tx86_64/'"),
    purl_type="apk",
    default_repositories=lambda release: [
        {"kind": "debian", "uri": "http://dl.example/alpine", "suite": f"v3.{release}"}],
))
