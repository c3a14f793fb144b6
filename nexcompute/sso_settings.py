"""Single sign-on settings (django-allauth), read from the environment. See docs/sso.md.

Imported at the end of ``nexcompute/settings.py``. One OIDC and one SAML identity provider can be
configured here; unset means that provider is off. More IdPs can be added in admin
(Social applications).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured

from accounts.sso import EDUPERSON_SCOPED_AFFILIATION, parse_group_map
from nexcompute.settings import env_bool, env_list, env_secret, env_str

# The provider id (OIDC) and organization slug (SAML) that make the fixed callback URLs:
# /accounts/oidc/university/login/callback/, /accounts/saml/university/{metadata,acs}/.
SSO_SLUG = "university"
# allauth keys social accounts by provider id; SAML needs its own so the two IdPs never share
# an account row even when they send the same subject.
SSO_SAML_PROVIDER_ID = "university-saml"

SSO_OIDC_ISSUER = env_str("SSO_OIDC_ISSUER", "").strip().rstrip("/")
SSO_OIDC_CLIENT_ID = env_str("SSO_OIDC_CLIENT_ID", "")
SSO_OIDC_CLIENT_SECRET = env_secret("SSO_OIDC_CLIENT_SECRET", "")
SSO_OIDC_NAME = env_str("SSO_OIDC_NAME", "") or "University login"
# Space- (as in OAuth) or comma-separated.
SSO_OIDC_SCOPES = env_str("SSO_OIDC_SCOPES", "").replace(",", " ").split() or [
    "openid",
    "profile",
    "email",
    "groups",
]
SSO_OIDC_GROUPS_CLAIM = env_str("SSO_OIDC_GROUPS_CLAIM", "") or "groups"

SSO_SAML_METADATA_URL = env_str("SSO_SAML_METADATA_URL", "").strip()
SSO_SAML_ENTITY_ID = env_str("SSO_SAML_ENTITY_ID", "").strip()
SSO_SAML_NAME = env_str("SSO_SAML_NAME", "") or "University login (SAML)"
SSO_SAML_AFFILIATION_ATTRIBUTE = (
    env_str("SSO_SAML_AFFILIATION_ATTRIBUTE", "") or EDUPERSON_SCOPED_AFFILIATION
)

SSO_STAFF_VALUES = env_list("SSO_STAFF_VALUES", ["staff", "faculty", "employee"])
SSO_GROUP_MAP = parse_group_map(env_str("SSO_GROUP_MAP", ""))
SSO_LOCAL_LOGIN = env_bool("SSO_LOCAL_LOGIN", True)

if SSO_OIDC_ISSUER and not SSO_OIDC_CLIENT_ID:
    raise ImproperlyConfigured("SSO_OIDC_ISSUER is set but SSO_OIDC_CLIENT_ID is empty")
if SSO_OIDC_ISSUER and "openid" not in SSO_OIDC_SCOPES:
    raise ImproperlyConfigured("SSO_OIDC_SCOPES must include 'openid'")

SOCIALACCOUNT_PROVIDERS: dict[str, Any] = {}
if SSO_OIDC_ISSUER:
    SOCIALACCOUNT_PROVIDERS["openid_connect"] = {
        "APPS": [
            {
                "provider_id": SSO_SLUG,
                "name": SSO_OIDC_NAME,
                "client_id": SSO_OIDC_CLIENT_ID,
                "secret": SSO_OIDC_CLIENT_SECRET,
                "settings": {
                    "server_url": SSO_OIDC_ISSUER,
                    "scope": SSO_OIDC_SCOPES,
                    "oauth_pkce_enabled": True,
                },
            }
        ]
    }
if SSO_SAML_METADATA_URL:
    SOCIALACCOUNT_PROVIDERS["saml"] = {
        "APPS": [
            {
                "provider_id": SSO_SAML_PROVIDER_ID,
                "name": SSO_SAML_NAME,
                "client_id": SSO_SLUG,
                "settings": {
                    "idp": {
                        # None: take the single IdP the metadata describes.
                        "entity_id": SSO_SAML_ENTITY_ID or None,
                        "metadata_url": SSO_SAML_METADATA_URL,
                    },
                    # Only the account uid comes from allauth's (first-value) mapping; names,
                    # email and the multi-valued affiliations are read from all attribute
                    # values in accounts/adapters.py.
                    "attribute_mapping": {
                        "uid": [
                            "urn:oasis:names:tc:SAML:attribute:subject-id",
                            "urn:oid:1.3.6.1.4.1.5923.1.1.1.6",  # eduPersonPrincipalName
                        ],
                    },
                    "advanced": {
                        "strict": True,
                        "want_assertion_signed": True,
                        # SHA-1 signatures are refused (python3-saml's default, stated here).
                        "reject_deprecated_algorithm": True,
                        "allow_single_label_domains": False,
                    },
                },
            }
        ]
    }

SOCIALACCOUNT_ADAPTER = "accounts.adapters.SsoAccountAdapter"
# Local accounts (staff, the demo) log in through Django's own LoginView at /accounts/login/;
# allauth handles third-party logins only, so its signup/password-reset pages do not exist.
SOCIALACCOUNT_ONLY = True
ACCOUNT_EMAIL_VERIFICATION = "none"
SOCIALACCOUNT_EMAIL_VERIFICATION = "none"
SOCIALACCOUNT_AUTO_SIGNUP = True
SOCIALACCOUNT_EMAIL_AUTHENTICATION = False  # never attach an IdP login to a local account by email
SOCIALACCOUNT_STORE_TOKENS = False
SOCIALACCOUNT_LOGIN_ON_GET = False  # the login buttons POST (with CSRF)
SOCIALACCOUNT_OPENID_CONNECT_URL_PREFIX = "oidc"
ACCOUNT_LOGOUT_REDIRECT_URL = "/accounts/login/"
